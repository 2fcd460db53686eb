"""``benchmark.png``: the panels a ``benchmark.json`` payload has data for."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import numpy as np

from duet_jax import files
from experiments.benchmark.summary import TARGET_DEVICES_PER_S, find_case, model_names

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the Agg backend


def plot(result: dict, path: str) -> None:
    """Up to six panels, each drawn only when the run measured what it shows: devices/s vs
    N, vs batch size, the adaptation comparison, the generation variants (vmap vs loop,
    low-rank, stages), the PyTorch reference's batch sweep and the streamed runs' peak RSS
    vs N. ``result``: the
    ``benchmark.json`` payload (``cases``, ``config``, ``environment``, ``load_average``)."""
    cases, config = result["cases"], result["config"]
    models = model_names(config["models"])
    panels = [p for p in (_n_sweep(cases, config, models), _b_sweep(cases, config, models),
                          _adaptation(cases, config, models), _variants(cases, config, models),
                          _torch_reference(cases), _streamed(cases, models)) if p is not None]
    if not panels:  # nothing this plot can show: say so rather than draw empty axes
        panels = [lambda ax: (ax.axis("off"), ax.text(
            0.5, 0.5, "no case of this run has a panel", ha="center", va="center"))]
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels, strict=False):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    env = result["environment"]
    fig.suptitle(f"duet_jax benchmark: {env['processor']} ({env['cpu_count']} cores), "
                 f"{env['jax_backend']}, load avg {result['load_average']['start'][0]:.1f}"
                 f"→{result['load_average']['end'][0]:.1f}")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


Panel = Callable[[object], object] | None


def _lines(series: dict[str, list[tuple[float, float]]], target: bool, xlabel: str,
           title: str) -> Panel:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None

    def draw(ax):
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts), strict=True), "o-", label=label)
        if target:
            ax.axhline(TARGET_DEVICES_PER_S, ls="--", c="gray", label="target (SASRec/GRU4Rec)")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="devices / s", title=title)
        ax.legend()

    return draw


def _sweep(cases, models, x: str, fixed: str, value, target: bool, xlabel: str,
           title: str) -> Panel:
    """devices/s of the generation cases against field ``x``, with field ``fixed`` at
    ``value``: one line per model."""
    return _lines({m: [(c[x], c["devices_per_s"]) for c in cases
                       if c["case"] == "generation" and c["model"] == m and c[fixed] == value]
                   for m in models}, target, xlabel, title)


def _n_sweep(cases, config, models) -> Panel:
    return _sweep(cases, models, "num_devices", "batch_size", config["batch_size"], True,
                  "devices N",
                  f"head generation, batch {config['batch_size']} (heads streamed)")


def _b_sweep(cases, config, models) -> Panel:
    return _sweep(cases, models, "batch_size", "num_devices", config["batch_sweep_devices"],
                  False, "batch size B",
                  f"head generation, N = {config['batch_sweep_devices']:,}")


def _value(cases, kind: str, key: str, **match) -> Callable[[str], float | None]:
    def pick(m):
        c = find_case(cases, kind, m, **match)
        return None if c is None else c[key]
    return pick


def _adaptation(cases, config, models) -> Panel:
    steps = config["finetune"]["steps"]
    labels = ["DUET (generate)"] + [f"fine-tune vmap k={k}" for k in steps] + [
        f"fine-tune loop k={k}" for k in steps]
    kinds = [_value(cases, "duet_adapt", "ms_per_device")] + [
        _value(cases, "finetune_vmap", "ms_per_device", steps=k) for k in steps] + [
        _value(cases, "finetune_loop", "ms_per_device", steps=k) for k in steps]
    return _bars(models, labels, kinds,
                 f"adaptation per device (fine-tuning: {config['finetune']['params']}, "
                 f"{config['finetune']['num_samples']} rows)", "ms / device")


def _variants(cases, config, models) -> Panel:
    labels = ["jit+vmap", "python loop", "low-rank", "encoder only", "decoder only"]
    kinds = [_value(cases, "generation", "devices_per_s", num_devices=config["loop_devices"],
                    batch_size=config["batch_size"]),
             _value(cases, "loop", "devices_per_s"), _value(cases, "low_rank", "devices_per_s"),
             _value(cases, "encoder", "devices_per_s"), _value(cases, "decoder", "devices_per_s")]
    if not any(find_case(cases, k, m) for k in ("loop", "low_rank", "encoder", "decoder")
               for m in models):
        return None  # generation alone is drawn by the sweeps
    return _bars(models, labels, kinds, "generation variants", "devices / s")


def _torch_reference(cases) -> Panel:
    rows = [c for c in cases if c["case"] == "torch_reference" and not c.get("skipped")]
    if not rows:
        return None
    row = rows[0]

    def draw(ax):
        sides = (("ours", "ours (duet_jax)", "o-"),
                 ("ours_split", f"ours split over {row.get('split_accelerators')} devices",
                  "^:"),
                 ("torch", "authors' design (torch)", "s--"))
        batches = set()
        for r, color in zip(rows, ("C0", "C2", "C4", "C6"), strict=False):
            for side, label, style in sides:
                if side not in r["sweep_devices_per_s"]:
                    continue  # one accelerator: nothing was split
                pts = sorted((int(b), v) for b, v in r["sweep_devices_per_s"][side].items())
                batches.update(b for b, _ in pts)
                ax.plot(*zip(*pts, strict=True), style, color=color,
                        label=f"{r['model']}: {label}")
        split = any("speedup_split_same_batch" in r for r in rows)
        ratios = (", " if not split else "\n").join(  # one line per head when split too
            f"{r['model']} {r['speedup_same_batch']['median']:.2f}x" + (
                f", split {r['speedup_split_same_batch']['median']:.2f}x"
                if "speedup_split_same_batch" in r else "") for r in rows)
        ratios = ratios if not split else "\n" + ratios
        ax.set(xscale="log", yscale="log", xlabel="batch size B (devices per call)",
               ylabel="devices / s",
               title=f"heads vs the PyTorch reference (torch threads {row['torch_threads']} "
                     f"of {row['threads']})\nours at torch's best B (paired): {ratios}")
        ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        ax.minorticks_off()
        ax.legend(fontsize=7)

    return draw


def _streamed(cases, models) -> Panel:
    series = {m: sorted((c["num_devices"], c["peak_rss_bytes"] / 2**30, c["devices_per_s"])
                        for c in cases if c["case"] == "streamed" and c["model"] == m)
              for m in models}
    series = {m: pts for m, pts in series.items() if pts}
    if not series:
        return None

    def draw(ax):
        for m, pts in series.items():
            n, rss, rate = zip(*pts, strict=True)
            ax.plot(n, rss, "o-", label=f"{m} ({min(rate) / 1e3:.0f}-{max(rate) / 1e3:.0f}k "
                                        "devices/s)")
        ax.set(xscale="log", xlabel="devices N (one run each)", ylabel="peak RSS (GiB)",
               title="streamed generation: memory against fleet size")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)

    return draw


def _bars(models: list[str], labels: list[str], kinds: list[Callable[[str], float | None]],
          title: str, ylabel: str) -> Panel:
    """Grouped bars: one group per model, one bar per ``labels`` entry that has a value for
    some model (missing ones are left out, not drawn as zero); None when none has."""
    values = [(label, [pick(m) for m in models]) for label, pick in zip(labels, kinds,
                                                                          strict=True)]
    values = [(label, vals) for label, vals in values if any(v for v in vals)]
    if not values:
        return None

    def draw(ax):
        width = 0.8 / len(values)
        for i, (label, vals) in enumerate(values):
            ax.bar(np.arange(len(models)) + i * width, [v or 0 for v in vals], width,
                   label=label)
        ax.set_xticks(np.arange(len(models)) + width * (len(values) - 1) / 2, models)
        ax.set(yscale="log", title=title, ylabel=ylabel)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the bars

    return draw
