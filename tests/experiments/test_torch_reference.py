"""The PyTorch reference generator computes the same function as ours, so the benchmark's
side-by-side timing compares like with like. Skipped where torch (benchmark-only) is absent."""

import jax
import numpy as np
import pytest

from duet_jax import duet as duet_lib
from duet_jax.duet import Duet
from duet_jax.models import ModelConfig, get_model
from experiments.benchmark import torch_reference

torch = pytest.importorskip("torch")


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


@pytest.mark.parametrize("prepared", [False, True])
def test_compare_reports_paired_ratios(prepared):
    duet, params, seq, _ = _setup(40)
    tables = duet.prepare(params) if prepared else None
    result = torch_reference.compare(duet, params, seq, (8, 16), rounds=2, sweep_repeats=1,
                                     prepared=tables)
    assert result["torch_best_batch"] in (8, 16) and result["ours_best_batch"] in (8, 16)
    assert result["threads"] == result["torch_threads"] >= 1
    assert result["ours_path"] == ("prepared" if prepared else "plain")
    keys = ["speedup_same_batch", "speedup_best_batch"]
    assert ("speedup_plain_same_batch" in result) == prepared
    for key in keys + (["speedup_plain_same_batch"] if prepared else []):
        r = result[key]
        assert len(r["per_round"]) == 2 and r["min"] <= r["median"] <= r["max"]
        assert all(np.isfinite(r["per_round"])) and r["min"] > 0
