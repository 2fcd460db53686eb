"""The benchmark as a user runs it, at tiny sizes: every case lands in a well-formed
``benchmark.json`` with positive, finite numbers, plus the plot. Correctness, not speed:
no timing is asserted. The committed results stay readable: the summary and the plot are
rebuilt from each ``benchmarks/results/**/benchmark.json``."""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from duet_jax import finetune
from duet_jax.models import ModelConfig, get_model
from experiments import cli
from experiments.benchmark import cases
from experiments.benchmark.plots import plot
from experiments.benchmark.summary import summarise

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--config.quick=True",
    "--config.models=sasrec",
    "--config.num_items=100",
    "--config.seq_len=8",
    "--config.embed_dim=8",
    "--config.num_devices=(40,)",
    "--config.batch_size=16",
    "--config.batch_sizes=(8,16)",
    "--config.batch_sweep_devices=32",
    "--config.split_devices=32",
    "--config.loop_devices=12",
    "--config.paired_rounds=2",
    "--config.low_rank=2",
    "--config.repeats=2",
    "--config.min_repeats=1",
    "--config.finetune.steps=(2,)",
    "--config.finetune.num_samples=4",
    "--config.finetune.group_size=4",
    "--config.finetune.devices=6",
    "--config.finetune.loop_devices=2",
    "--config.peak_matmul_size=64",
    "--config.peak_bandwidth_mb=1",
    "--config.scaling.devices=64",
    "--config.scaling.per_accelerator_batch=16",
    "--config.scaling.fake_devices=(2,)",
    "--config.torch_reference.devices=32",
    "--config.torch_reference.batch_sizes=(8,16)",
    "--config.streamed_devices=(40,)",
    "--config.streamed_batch_size=16",
    "--config.progress=False",
]
GLIBC = cli.is_glibc()
KINDS = {"generation", "encoder", "decoder", "low_rank", "loop", "duet_adapt",
         "finetune_vmap", "finetune_loop", "scaling", "torch_reference", "encoder_option",
         "prepared", "vector_width", "streamed", "generation_split"}
try:  # the torch reference case is benchmark-only: skipped (noted) without torch
    import torch  # noqa: F401
    TORCH = True
except ImportError:
    TORCH = False


def _positive_finite(value):
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow  # a whole job end to end (20-35 s); CI runs it
def test_quick_benchmark_writes_every_case(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    malloc = [f"--malloc_keep_freed={GLIBC}"]  # applied (and recorded) where it exists
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path}", *TINY, *malloc],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["complete"] and (tmp_path / "benchmark.png").stat().st_size > 0
    # command-line overrides beat the quick sizes
    assert result["config"]["num_devices"] == [40] and result["config"]["quick"]
    env_info = result["environment"]
    assert env_info["processor"] and env_info["versions"]["jax"] and env_info["versions"]["flax"]
    assert env_info["malloc_keep_freed"] is GLIBC
    assert len(result["load_average"]["start"]) == 3 and len(result["load_average"]["end"]) == 3
    assert result["gpu"]["lent"] is False and "No GPU" in result["gpu"]["note"]
    for name in ("matmul", "bandwidth"):
        assert all(_positive_finite(v) for v in result["peaks"][name].values())
    cases = result["cases"]
    assert {(c["case"], c["model"]) for c in cases if c["case"] != "scaling"} == {
        (k, "sasrec") for k in KINDS - {"scaling"}}
    torch_row = next(c for c in cases if c["case"] == "torch_reference")
    assert torch_row.get("skipped", False) is not TORCH
    if TORCH:
        assert torch_row["num_devices"] == 32 and torch_row["rounds"] == 2
        assert torch_row["ours_path"] == "prepared"  # the default: what the cloud serves
        for key in ("speedup_same_batch", "speedup_best_batch", "speedup_plain_same_batch"):
            r = torch_row[key]
            assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
        t = result["summary"]["torch_reference"]
        assert t["speedup_at_torch_best_batch"] == torch_row["speedup_same_batch"]["median"]
        assert "over_torch_reference_at_least_3x" in result["summary"]["acceptance"]
    options = [c for c in cases if c["case"] == "encoder_option"]
    assert [c["encoder"] for c in options] == ["gru_bf16", "attention"]
    for c in options:
        r = c["speedup_vs_gru"]
        assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
        assert _positive_finite(c["gru_devices_per_s"])
    prepared = next(c for c in cases if c["case"] == "prepared")
    assert prepared["tables"] == ["features"]  # SASRec: its split input projection
    assert prepared["table_bytes"] == (100 + 1 + 8) * 8 * 4  # items + positions, D = 8
    r = prepared["speedup_vs_plain"]
    assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
    assert all(c["path"] == "prepared" for c in cases if c["case"] == "generation")
    # every compiled case uses the config's vector width; the paired case against XLA's default
    assert result["config"]["cpu_vector_width"] == 512
    widths = [c for c in cases if c["case"] == "vector_width"]
    assert [c["batch_size"] for c in widths] == [8, 16]
    for c in widths:
        r = c["speedup_vs_default"]
        assert c["vector_width"] == 512 and c["backend"] == "cpu"
        assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
    # streamed: 40 devices in 3 calls of 16 drawn in-call, one pass, its peak RSS
    streamed = next(c for c in cases if c["case"] == "streamed")
    assert (streamed["num_devices"], streamed["calls"], streamed["padded_devices"]) == (40, 3, 48)
    assert _positive_finite(streamed["peak_rss_bytes"]) and _positive_finite(streamed["seconds"])
    # one accelerator in this process: the split case says so instead of timing nothing
    split = next(c for c in cases if c["case"] == "generation_split")
    assert split["skipped"] and "one accelerator" in split["note"]
    assert "split_over_accelerators" not in result["summary"]["models"]["sasrec"]
    for c in cases:
        if c["case"] in ("torch_reference", "generation_split"):
            continue
        if c["case"] in ("encoder_option", "prepared", "vector_width", "streamed"):
            assert _positive_finite(c["devices_per_s"])
            continue
        assert _positive_finite(c["devices_per_s"]), c
        t = c["timing"]
        assert t["repeats"] >= 1 and len(t["repeats_s"]) == t["repeats"]
        assert all(_positive_finite(t[k]) for k in ("compile_s", "first_call_s", "median_s"))
        assert t["min_s"] <= t["median_s"] <= t["max_s"] and t["iqr_s"] >= 0
        if c["case"] == "scaling":
            continue
        for key in ("ms_per_device", "flops_per_device", "bytes_per_device",
                    "fraction_of_peak_flops", "fraction_of_peak_bandwidth", "peak_rss_bytes",
                    "xla_flops_per_device", "output_bytes_per_device"):
            assert _positive_finite(c[key]), (key, c)
    gens = {(c["model"], c["num_devices"], c["batch_size"]) for c in cases
            if c["case"] == "generation"}
    assert {("sasrec", 40, 16), ("sasrec", 32, 8), ("sasrec", 12, 16)} <= gens
    scaling = [c for c in cases if c["case"] == "scaling"]
    assert [c["fake"] for c in scaling] == [False, True]
    assert [c["accelerators"] for c in scaling] == [1, 2]
    summary = result["summary"]["models"]
    s = summary["sasrec"]
    # the loop and jit+vmap over the same devices, timed alternately round by round
    paired = next(c for c in cases if c["case"] == "loop")["paired_with_vmap"]
    assert paired["rounds"] == 2 and len(paired["loop_s"]) == len(paired["vmap_s"]) == 2
    assert paired["speedups"] == [lo / v for lo, v in zip(paired["loop_s"], paired["vmap_s"],
                                                          strict=True)]
    assert all(_positive_finite(v) for v in paired["speedups"])
    assert paired["min_speedup"] <= paired["median_speedup"] <= paired["max_speedup"]
    assert s["vmap_vs_loop"]["speedup"] == paired["median_speedup"]
    assert _positive_finite(s["vmap_vs_loop"]["unpaired_speedup"])
    assert set(s["adaptation"]["finetune_over_duet"]) == {"finetune_vmap_head_k2",
                                                          "finetune_loop_head_k2"}
    assert set(s["split_ms_per_device"]) == {"encoder", "decoder", "full"}
    assert set(s["vector_width_speedup"]) == {"8", "16", "vector_width"}
    assert set(s["streamed"]) == {"40"}
    assert set(result["summary"]["acceptance"]) >= {"vmap_vs_loop_at_least_10x",
                                                    "sequential_finetune_at_least_100x_duet"}


@pytest.mark.slow  # a benchmark job in a subprocess with 2 fake CPU devices (~20 s)
def test_accelerators_case_splits_each_batch_and_pairs_it_with_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path}", *TINY,
         "--config.cases=accelerators", "--config.models=sasrec,gru4rec"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    rows = result["cases"]
    assert {(c["model"], c["batch_size"]) for c in rows} == {
        (m, b) for m in ("sasrec", "gru4rec") for b in (8, 16)}
    for c in rows:
        assert c["case"] == "generation_split" and c["accelerators"] == 2
        assert c["num_devices"] == 32 and c["path"] == "prepared"
        r = c["speedup_vs_one"]
        assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
        assert _positive_finite(c["devices_per_s"]) and _positive_finite(c["one_devices_per_s"])
    for m in ("sasrec", "gru4rec"):
        s = result["summary"]["models"][m]["split_over_accelerators"]
        best = max((c for c in rows if c["model"] == m), key=lambda c: c["devices_per_s"])
        assert s["best_devices_per_s"] == best["devices_per_s"]
        assert s["best_batch_size"] == best["batch_size"] and s["accelerators"] == 2
        assert set(s["by_batch_size"]) == {"8", "16"} and "target_met" in s
    # a batch size that does not split evenly is refused before any case runs
    tiny = [a for a in TINY if not a.startswith("--config.batch_sizes=")]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path / 'odd'}", *tiny,
         "--config.cases=accelerators", "--config.batch_sizes=(8,7)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "config.batch_sizes=(8, 7) is invalid" in proc.stderr
    assert "2 accelerators" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "odd" / "benchmark.json").exists()
    # so is the torch comparison's, which splits its batches over them too
    tiny = [a for a in TINY if not a.startswith("--config.torch_reference.batch_sizes=")]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path / 'odd2'}", *tiny,
         "--config.cases=generation,torch_reference",
         "--config.torch_reference.batch_sizes=(8,9)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.torch_reference.batch_sizes=(8, 9) is invalid" in proc.stderr
    assert not (tmp_path / "odd2" / "benchmark.json").exists()


COMMITTED = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "benchmark.json"),
                             recursive=True))


def _contains(rebuilt, stored) -> bool:
    """``stored`` is ``rebuilt`` with some dict keys left out (older runs of the benchmark
    recorded fewer summary fields)."""
    if isinstance(stored, dict):
        return isinstance(rebuilt, dict) and all(
            k in rebuilt and _contains(rebuilt[k], v) for k, v in stored.items())
    return rebuilt == stored


# a partial run (e.g. only the DIN loop) leaves panels empty: matplotlib warns, the PNG is fine
@pytest.mark.filterwarnings("ignore:Data has no positive values", "ignore:No artists with labels")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: os.path.relpath(p, ROOT))
def test_committed_results_rebuild_their_summary_and_plot(path, tmp_path):
    with open(path) as f:
        result = json.load(f)
    assert result["complete"]
    rebuilt = summarise(result["cases"], ml_collections.ConfigDict(result["config"]))
    assert _contains(rebuilt, result["summary"])  # the same arithmetic on the same rows
    plot(result, str(tmp_path / "benchmark.png"))
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequences_drawn_on_device_follow_the_host_pool_distribution():
    """The streamed case's in-call sequences: right-padded ids in 1..items, lengths 1..L,
    as the host pool's (``random_sequences``), and a new draw for every call index."""
    import jax
    import numpy as np

    from experiments.benchmark.scaling import random_sequences_on_device

    n, length, items = 4000, 6, 50
    key = jax.random.key(0)
    seq = np.asarray(random_sequences_on_device(jax.random.fold_in(key, 0), n, length, items))
    assert seq.shape == (n, length) and seq.dtype == np.int32
    valid = seq != 0
    lengths = valid.sum(1)
    # right-padded: every valid position comes before every padded one
    np.testing.assert_array_equal(valid, np.arange(length)[None, :] < lengths[:, None])
    assert set(np.unique(lengths)) == set(range(1, length + 1))
    assert seq[valid].min() >= 1 and seq[valid].max() <= items
    assert len(np.unique(seq[valid])) == items  # 12,000+ draws cover all 50 ids
    # lengths uniform: each of 6 values ~ 667 times; binomial sd ~ 24, so 5 sd = 120
    assert np.all(np.abs(np.bincount(lengths, minlength=length + 1)[1:] - n / length) < 120)
    other = np.asarray(random_sequences_on_device(jax.random.fold_in(key, 1), n, length, items))
    assert not np.array_equal(seq, other)


def test_trigger_lengths_start_at_the_configured_minimum():
    from experiments.benchmark import scaling
    from experiments.configs import benchmark as benchmark_config

    rng = np.random.default_rng(0)
    seq = scaling.random_sequences(rng, 3000, 6, 50, min_length=4)
    lengths = (seq != 0).sum(1)
    assert set(np.unique(lengths)) == {4, 5, 6}  # 3,000 draws of 3 values: all appear
    full = scaling.random_sequences(rng, 100, 6, 50, min_length=6)
    assert (full != 0).all()  # the control: every trigger full, nothing to cut
    config = benchmark_config.get_config()
    with config.unlocked():
        config.min_trigger_length = config.seq_len + 1
    with pytest.raises(cli.ConfigError, match=r"config\.min_trigger_length=31"):
        cases.Bench(config)


def test_summary_reports_every_torch_head_and_keeps_sasrec_as_the_headline():
    def row(model, median):
        ratio = {"median": median, "min": median - 0.1, "max": median + 0.1}
        return {"case": "torch_reference", "model": model, "num_devices": 64, "threads": 2,
                "torch_threads": 2, "torch_best_batch": 8, "ours_best_batch": 16,
                "devices_per_s": {"torch": 1.0}, "rounds": 2, "speedup_same_batch": ratio,
                "speedup_best_batch": ratio}

    from experiments.configs import benchmark as benchmark_config

    config = benchmark_config.get_config()
    config.models = "din,sasrec"
    out = summarise([row("din", 1.5), row("sasrec", 3.2)], config)
    assert out["torch_reference"]["model"] == "sasrec"
    assert out["torch_reference"]["speedup_at_torch_best_batch"] == 3.2
    assert out["acceptance"]["over_torch_reference_at_least_3x"] is True
    by_model = out["torch_reference_by_model"]
    assert {m: r["speedup_at_torch_best_batch"] for m, r in by_model.items()} == {
        "din": 1.5, "sasrec": 3.2}
    assert "split_over_torch_reference_at_least_3x" not in out["acceptance"]
    # a process with several accelerators also splits each batch over them: reported
    # beside the one-accelerator figures, with its own acceptance line
    split = row("sasrec", 2.9)
    split.update(split_accelerators=2, ours_split_best_batch=16,
                 speedup_split_same_batch={"median": 2.8, "min": 2.5, "max": 3.1},
                 speedup_split_best_batch={"median": 2.95, "min": 2.6, "max": 3.2})
    out = summarise([split], config)
    t = out["torch_reference"]
    assert t["split_accelerators"] == 2 and t["ours_split_best_batch"] == 16
    assert t["split_speedup_at_torch_best_batch"] == 2.8
    assert t["split_speedup_at_torch_best_batch_range"] == [2.5, 3.1]
    assert t["split_speedup_best_vs_best"] == 2.95
    assert out["acceptance"]["over_torch_reference_at_least_3x"] is False
    assert out["acceptance"]["split_over_torch_reference_at_least_3x"] is False


def test_all_parameter_fine_tuning_case_carries_each_devices_own_rows_at_one_width():
    # the adaptation case times what the library runs: each device's own item rows
    # (finetune.group_inputs), every group padded to one width so one compilation serves all
    model = get_model("sasrec", ModelConfig(num_items=300, seq_len=6, embed_dim=8))
    rng = np.random.default_rng(0)

    def rows(n, high):  # n devices of 4 rows, ids below ``high``: few ids -> narrow tables
        return {"click_seq": rng.integers(0, high, (n, 4, 6), dtype=np.int32),
                "target": rng.integers(1, high, (n, 4), dtype=np.int32),
                "label": rng.integers(0, 2, (n, 4)).astype(np.float32),
                "weight": np.ones((n, 4), np.float32)}

    groups = [rows(2, 12), rows(2, 300)]  # widths 16 and 64 before padding
    made = cases._group_inputs(model, "all", groups)
    widths = {finetune.local_items(g)[0].shape[1] for g in groups}
    assert len(widths) == 2 and {r.shape[1] for _, r in made} == {max(widths)}
    assert all(r is None for _, r in cases._group_inputs(model, "head", groups))
    # padding the narrow group's rows with 0 changes nothing it computes
    base = model.init(jax.random.key(1))
    own_rows, (own,) = finetune.local_items(groups[0])
    narrow = cases._finetune(model, "all", 3, base, None, own, jnp.float32(1e-2), own_rows)
    padded = cases._finetune(model, "all", 3, base, None, made[0][0], jnp.float32(1e-2),
                             made[0][1])
    # the same operations on the same rows; the table's gradient is scattered into a wider
    # array, which may sum in another order: a parameter moves at most lr per Adam step,
    # and two orders change a step by a float32 rounding of it (1e-3 of lr is far above that)
    for a, b in zip(jax.tree.leaves(narrow["head"]), jax.tree.leaves(padded["head"]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=3 * 1e-2 * 1e-3)
    width = own_rows.shape[1]
    np.testing.assert_allclose(np.asarray(padded["backbone"]["item_embedding"])[:, :width],
                               np.asarray(narrow["backbone"]["item_embedding"]),
                               rtol=0, atol=3 * 1e-2 * 1e-3)
