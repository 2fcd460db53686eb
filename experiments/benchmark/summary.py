"""The benchmark's headline numbers (``benchmark.json["summary"]``): the best throughput
against its target, the speed-up of batching, the cost of fine-tuning relative to DUET, the
encoder/decoder split, the low-rank gain, and what bounds generation.

Reads only ``cases`` rows and the config fields used below, so it works on the committed
``benchmarks/results/*/benchmark.json`` as well as on a fresh run.
"""

from __future__ import annotations

# devices/s of head generation aimed at, for the sequence-encoder device models
TARGET_DEVICES_PER_S = 250_000
TARGET_MODELS = ("sasrec", "gru4rec")
# acceptance: jit+vmap generation at least this many times a Python loop of single calls
VMAP_OVER_LOOP = 10
# acceptance: one-device-at-a-time fine-tuning at least this many times DUET's cost
SEQUENTIAL_FINETUNE_OVER_DUET = 100
# acceptance: ours at least this many times the authors' PyTorch generator design, at the
# reference's best batch size (median of the paired rounds' ratios)
OVER_TORCH_REFERENCE = 3


def model_names(models: str) -> list[str]:
    """``config.models`` (comma-separated) -> names."""
    return [m.strip() for m in models.split(",")]


def find_case(cases: list[dict], kind: str, model: str, **match) -> dict | None:
    """The first row of ``kind`` for ``model`` whose fields equal ``match``; None if none."""
    for c in cases:
        if c["case"] == kind and c["model"] == model and all(
                c.get(k) == v for k, v in match.items()):
            return c
    return None


def summarise(cases: list[dict], config) -> dict:
    """The headline numbers per model and the acceptance checks. ``config``: the run's
    config (attribute access: a ``ConfigDict``)."""
    out: dict = {"models": {}}
    for model in model_names(config.models):
        out["models"][model] = _summarise_model(cases, config, model)
    out["acceptance"] = {
        f"vmap_vs_loop_at_least_{VMAP_OVER_LOOP}x": {
            m: s["vmap_vs_loop"]["speedup"] >= VMAP_OVER_LOOP
            for m, s in out["models"].items() if "vmap_vs_loop" in s},
        f"sequential_finetune_at_least_{SEQUENTIAL_FINETUNE_OVER_DUET}x_duet": {
            f"{m}/{k}": v >= SEQUENTIAL_FINETUNE_OVER_DUET
            for m, s in out["models"].items() if "adaptation" in s
            for k, v in s["adaptation"]["finetune_over_duet"].items()
            if k.startswith("finetune_loop")},
    }
    torch_rows = [c for c in cases if c["case"] == "torch_reference" and not c.get("skipped")]
    if len(torch_rows) > 1 or (torch_rows and torch_rows[0]["model"] != "sasrec"):
        out["torch_reference_by_model"] = {t["model"]: {
            "torch_best_batch": t["torch_best_batch"], "ours_best_batch": t["ours_best_batch"],
            "devices_per_s": t["devices_per_s"],
            "speedup_at_torch_best_batch": t["speedup_same_batch"]["median"],
            "speedup_at_torch_best_batch_range": [t["speedup_same_batch"]["min"],
                                                  t["speedup_same_batch"]["max"]],
            "speedup_best_vs_best": t["speedup_best_batch"]["median"]} for t in torch_rows}
    # the headline (and the 3x acceptance check): SASRec's head where it was measured
    torch_rows.sort(key=lambda c: c["model"] != "sasrec")
    if torch_rows:
        t = torch_rows[0]
        out["torch_reference"] = {
            "model": t["model"], "num_devices": t["num_devices"], "threads": t["threads"],
            "torch_threads": t.get("torch_threads", t["threads"]),
            "torch_best_batch": t["torch_best_batch"], "ours_best_batch": t["ours_best_batch"],
            "devices_per_s": t["devices_per_s"], "rounds": t["rounds"],
            "speedup_at_torch_best_batch": t["speedup_same_batch"]["median"],
            "speedup_at_torch_best_batch_range": [t["speedup_same_batch"]["min"],
                                                  t["speedup_same_batch"]["max"]],
            "speedup_best_vs_best": t["speedup_best_batch"]["median"],
            "speedup_best_vs_best_range": [t["speedup_best_batch"]["min"],
                                           t["speedup_best_batch"]["max"]],
            "measured": "paired rounds, median of per-round ratios (torch s / ours s)",
            "ours_path": t.get("ours_path", "plain")}
        if "trigger_steps_mean" in t:  # what ordering by length can skip: the reference
            # runs all seq_len steps for every device
            out["torch_reference"].update(
                ours_ordered_by_length=t["ours_ordered_by_length"],
                trigger_steps_mean=t["trigger_steps_mean"], seq_len=t["seq_len"])
        for key in ("unordered", "split_unordered"):
            if f"speedup_{key}_same_batch" in t:  # ours without ordering, same rounds
                r = t[f"speedup_{key}_same_batch"]
                out["torch_reference"][f"{key}_speedup_at_torch_best_batch"] = r["median"]
                out["torch_reference"][f"{key}_speedup_at_torch_best_batch_range"] = [
                    r["min"], r["max"]]
        if "speedup_plain_same_batch" in t:  # Duet.generate without the prepared tables
            out["torch_reference"]["plain_speedup_at_torch_best_batch"] = (
                t["speedup_plain_same_batch"]["median"])
        if "speedup_split_same_batch" in t:  # each batch split over the process's devices
            split, best = t["speedup_split_same_batch"], t["speedup_split_best_batch"]
            out["torch_reference"].update(
                split_accelerators=t["split_accelerators"],
                ours_split_best_batch=t["ours_split_best_batch"],
                split_speedup_at_torch_best_batch=split["median"],
                split_speedup_at_torch_best_batch_range=[split["min"], split["max"]],
                split_speedup_best_vs_best=best["median"],
                split_speedup_best_vs_best_range=[best["min"], best["max"]])
        if t.get("torch_threads", t["threads"]) == t["threads"]:  # only with threads equal
            out["acceptance"][f"over_torch_reference_at_least_{OVER_TORCH_REFERENCE}x"] = (
                t["speedup_same_batch"]["median"] >= OVER_TORCH_REFERENCE)
            if "speedup_split_same_batch" in t:
                out["acceptance"][
                    f"split_over_torch_reference_at_least_{OVER_TORCH_REFERENCE}x"] = (
                    t["speedup_split_same_batch"]["median"] >= OVER_TORCH_REFERENCE)
    return out


def _summarise_model(cases: list[dict], config, model: str) -> dict:
    s: dict = {}
    gens = [c for c in cases if c["case"] == "generation" and c["model"] == model]
    if gens:
        best = max(gens, key=lambda c: c["devices_per_s"])
        s["best_devices_per_s"] = best["devices_per_s"]
        s["best_at"] = {"num_devices": best["num_devices"], "batch_size": best["batch_size"]}
        s["target_devices_per_s"] = TARGET_DEVICES_PER_S if model in TARGET_MODELS else None
        if s["target_devices_per_s"]:
            s["target_met"] = best["devices_per_s"] >= TARGET_DEVICES_PER_S
        f, b = best["fraction_of_peak_flops"], best["fraction_of_peak_bandwidth"]
        s["fraction_of_peak_flops"], s["fraction_of_peak_bandwidth"] = f, b
        s["output_fraction_of_peak_bandwidth"] = best["output_fraction_of_peak_bandwidth"]
        s["bound"] = ("compute (matmul rate)" if f >= b else "memory bandwidth") + (
            "" if max(f, b) >= 0.3 else
            ": but both fractions are low, so latency-bound (small matmuls, the "
            "encoder GRU's sequential steps, dispatch)")
    loop = find_case(cases, "loop", model)
    vmap = find_case(cases, "generation", model, num_devices=config.loop_devices,
                     batch_size=config.batch_size)
    paired = loop.get("paired_with_vmap") if loop else None
    if loop and (vmap or paired):
        # the paired (alternating) measurement when there is one; the ratio of the two
        # separately timed cases is kept beside it
        s["vmap_vs_loop"] = {"num_devices": config.loop_devices, "loop_extrapolated": False}
        if vmap:
            s["vmap_vs_loop"]["unpaired_speedup"] = (vmap["devices_per_s"]
                                                     / loop["devices_per_s"])
        if paired:
            s["vmap_vs_loop"] |= {
                "speedup": paired["median_speedup"], "measured": "paired rounds, median",
                "rounds": paired["rounds"],
                "speedup_range": [paired["min_speedup"], paired["max_speedup"]]}
        else:
            s["vmap_vs_loop"] |= {"speedup": s["vmap_vs_loop"]["unpaired_speedup"],
                                  "measured": "separate cases"}
    duet = find_case(cases, "duet_adapt", model)
    if duet:
        ratios = {}
        for c in cases:
            if c["model"] == model and c["case"] in ("finetune_vmap", "finetune_loop"):
                name = f"{c['case']}_{c['params']}_k{c['steps']}"
                ratios[name] = c["ms_per_device"] / duet["ms_per_device"]
        s["adaptation"] = {"duet_ms_per_device": duet["ms_per_device"],
                           "duet_group_size": duet["batch_size"],
                           "finetune_over_duet": ratios}
    enc, dec = find_case(cases, "encoder", model), find_case(cases, "decoder", model)
    full = find_case(cases, "generation", model, num_devices=config.split_devices,
                     batch_size=config.batch_size)
    if enc and dec and full:
        s["split_ms_per_device"] = {"encoder": enc["ms_per_device"],
                                    "decoder": dec["ms_per_device"],
                                    "full": full["ms_per_device"]}
    low = find_case(cases, "low_rank", model)
    if low and full:
        s["low_rank_vs_full_speedup"] = low["devices_per_s"] / full["devices_per_s"]
    streamed = [c for c in cases if c["case"] == "streamed" and c["model"] == model]
    if streamed:  # memory against N: flat when nothing per device is kept
        s["streamed"] = {str(c["num_devices"]): {
            "devices_per_s": c["devices_per_s"], "peak_rss_bytes": c["peak_rss_bytes"]}
            for c in streamed}
    splits = [c for c in cases if c["case"] == "generation_split" and c["model"] == model
              and not c.get("skipped")]
    if splits:  # each batch split over the process's accelerators, paired with one
        best = max(splits, key=lambda c: c["devices_per_s"])
        s["split_over_accelerators"] = {
            "accelerators": best["accelerators"], "best_devices_per_s": best["devices_per_s"],
            "best_batch_size": best["batch_size"],
            "by_batch_size": {str(c["batch_size"]): {
                "devices_per_s": c["devices_per_s"],
                "one_accelerator_devices_per_s": c["one_devices_per_s"],
                "speedup_vs_one": {k: c["speedup_vs_one"][k] for k in ("median", "min", "max")}}
                for c in splits}}
        if model in TARGET_MODELS:
            s["split_over_accelerators"]["target_met"] = (
                best["devices_per_s"] >= TARGET_DEVICES_PER_S)
    widths = [c for c in cases if c["case"] == "vector_width" and c["model"] == model]
    if widths:  # paired: XLA's default seconds / ours, median and range per batch size
        s["vector_width_speedup"] = {
            str(c["batch_size"]): {k: c["speedup_vs_default"][k] for k in ("median", "min", "max")}
            for c in widths} | {"vector_width": widths[0]["vector_width"]}
    return s
