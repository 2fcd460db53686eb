"""The PyTorch reference generator computes the same function as ours, so the benchmark's
side-by-side timing compares like with like. Skipped where torch (benchmark-only) is absent."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from duet_jax import duet as duet_lib
from duet_jax.duet import Duet
from duet_jax.models import ModelConfig, get_model
from experiments.benchmark import torch_reference

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(n: int = 12, model: str = "sasrec"):
    config = ModelConfig(num_items=50, seq_len=7, embed_dim=8, din_hidden=(12, 6))
    duet = Duet.create(get_model(model, config))
    params = duet.init(jax.random.key(3))
    if model == "sasrec":
        # the reference has no position embedding: zero ours so both compute one function
        params["backbone"]["position_embedding"] = np.zeros_like(
            params["backbone"]["position_embedding"])
    rng = np.random.default_rng(0)
    # glorot decoders with zero biases write small heads at init: perturb every generator
    # parameter so that outputs are O(1) and a wiring error shows
    params["generator"] = jax.tree.map(
        lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), params["generator"])
    lengths = rng.integers(1, config.seq_len + 1, n)
    seq = rng.integers(1, config.num_items + 1, (n, config.seq_len)).astype(np.int32)
    seq[np.arange(config.seq_len)[None] >= lengths[:, None]] = 0
    units = torch_reference.head_units(duet)
    user = rng.normal(size=(n, units[0])).astype(np.float32)
    return duet, params, seq, user


def test_head_units():
    config = ModelConfig(num_items=50, seq_len=7, embed_dim=8, din_hidden=(12, 6))
    units = lambda m: torch_reference.head_units(Duet.create(get_model(m, config)))
    assert units("sasrec") == units("gru4rec") == (8, 8, 8)
    assert units("din") == (16, 12, 6, 1)  # [target; interest] -> hidden -> 1 logit


@pytest.mark.parametrize("model", ["sasrec", "din"])
def test_torch_reference_equals_ours_with_copied_parameters(monkeypatch, model):
    duet, params, seq, user = _setup(model=model)
    units = torch_reference.head_units(duet)
    module = torch_reference.build_torch_generator(50, 8, units=units)
    torch_reference.load_ours_into(module, params)
    with torch.inference_mode():
        want = module(torch.from_numpy(seq.astype(np.int64)), torch.from_numpy(user)).numpy()
    got = np.asarray(jax.jit(torch_reference.ours_fn(duet))(params, seq, user))
    assert got.shape == want.shape == (len(seq), units[-1])
    # float32 throughout, different summation orders: a GRU of 7 steps and up to 5 dense
    # layers of width <= 16, activations O(1) (tanh-bounded, xavier weights): each product
    # carries ~16 * 2^-24 relative error and 7 + 5 such layers compound to ~1e-5 relative;
    # 1e-4 absolute on O(1) outputs leaves room, while any wiring error (gate order,
    # transposed kernel, wrong gather, a missing tanh) moves outputs by O(0.1).
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 0.1  # not trivially zero
    # from Duet.prepare's tables (what the benchmark times): the same function, in one
    # call and in chunks of 4 devices
    prepared = jax.jit(duet.prepare)(params)
    got = np.asarray(jax.jit(torch_reference.ours_fn(duet, prepared=True))(prepared, seq, user))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(duet_lib, "ENCODE_CHUNK", 4)
    got = np.asarray(jax.jit(torch_reference.ours_fn(duet, prepared=True))(prepared, seq, user))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # ordered by trigger length before the chunks (the cloud's path): outputs come back in
    # the input's order, so each still matches its own device's reference output
    ordered = torch_reference.ours_fn(duet, prepared=True, by_length=True)
    got = np.asarray(jax.jit(ordered)(prepared, seq, user))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prepared", [False, True])
def test_compare_reports_paired_ratios(prepared):
    duet, params, seq, _ = _setup(40)
    tables = duet.prepare(params) if prepared else None
    result = torch_reference.compare(duet, params, seq, (8, 16), rounds=2, sweep_repeats=1,
                                     prepared=tables, by_length=True)
    assert result["torch_best_batch"] in (8, 16) and result["ours_best_batch"] in (8, 16)
    assert result["threads"] == result["torch_threads"] >= 1
    assert result["ours_path"] == ("prepared" if prepared else "plain")
    # ordering by length needs the prepared tables; the unordered path is then timed too
    assert result["ours_ordered_by_length"] == prepared
    assert result["seq_len"] == 7
    assert result["trigger_steps_mean"] == pytest.approx(
        float(np.mean(duet_lib.steps_needed(seq))))
    keys = ["speedup_same_batch", "speedup_best_batch"]
    extra = ["speedup_plain_same_batch", "speedup_unordered_same_batch"]
    assert all((key in result) == prepared for key in extra)
    for key in keys + (extra if prepared else []):
        r = result[key]
        assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
        assert all(np.isfinite(r["per_round"])) and r["min"] > 0


def _split_check() -> dict:
    """Runs in a subprocess with 2 fake CPU devices: ours split over them (each batch half
    on each device) against ours on one device, and the paired rounds with the split."""
    from duet_jax import sharding

    assert jax.local_device_count() == 2, jax.devices()
    duet, params, seq, user = _setup(40)
    tables = jax.jit(duet.prepare)(params)
    fn = torch_reference.ours_fn(duet, prepared=True)
    mesh = sharding.device_mesh()
    want = np.asarray(jax.jit(fn)(tables, seq, user))
    split = jax.jit(sharding.per_row(fn, mesh, 2))
    got = split(sharding.replicate(tables, mesh), *sharding.shard_devices((seq, user), mesh))
    # one batch size: the sweep's choice is tested above, this is the split's bookkeeping
    result = torch_reference.compare(duet, params, seq, (16,), rounds=2, sweep_repeats=1,
                                     prepared=tables, mesh=mesh, by_length=True)
    try:
        torch_reference.compare(duet, params, seq, (8, 15), rounds=1, mesh=mesh)
        refused = False
    except ValueError as e:
        refused = "multiple of the 2" in str(e)
    return {"max_abs_diff": float(np.abs(np.asarray(got) - want).max()),
            "max_abs": float(np.abs(want).max()), "on_both": len(got.sharding.device_set) == 2,
            "refused_odd_batch": refused,
            "result": {k: result.get(k) for k in (
                "split_accelerators", "ours_split_best_batch", "speedup_split_same_batch",
                "speedup_split_best_batch", "speedup_split_unordered_same_batch")}}


def test_ours_split_over_two_accelerators_equals_one_and_is_timed_in_the_rounds():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    code = ("import json, tests.experiments.test_torch_reference as t; "
            "print(json.dumps(t._split_check()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on_both"] and out["refused_odd_batch"]
    # the same rows through the same float32 ops, 20 per device instead of 40 in one call:
    # only the compiler's choice of summation order for another batch shape can differ,
    # far inside the 1e-4 bound of the torch comparison above (same network, same sizes)
    assert out["max_abs"] > 0.1 and out["max_abs_diff"] <= 1e-4
    r = out["result"]
    assert r["split_accelerators"] == 2 and r["ours_split_best_batch"] == 16
    for key in ("speedup_split_same_batch", "speedup_split_best_batch",
                "speedup_split_unordered_same_batch"):
        assert len(r[key]["per_round"]) == 2 and r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        assert r[key]["min"] > 0
