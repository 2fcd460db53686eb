"""Sharded generation and fine-tuning equal the unsharded results on 8 fake CPU devices.

The device count is fixed when JAX starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; :func:`_check` is that subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from duet_jax import sharding
from tests import tolerances as tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_DEVICES = 8
D, SEQ_LEN, DIN_HIDDEN = 8, 6, (16, 8)
EMBED = {"sasrec": (1, D), "gru4rec": (D,), "din": (D,)}  # each model's sequence embedding


def _generate_atol(name: str) -> float:
    """Sharded vs plain generation: two float32 evaluations of other shapes (the generator at
    hidden = z = D; a low-rank leaf's core is a decoder output like any leaf, U and V are
    parameters passed through)."""
    n = tol.generator_roundings(SEQ_LEN, D, D, D, embed=EMBED[name])
    return float(tol.f32_pair_atol(n, tol.MODEL_SCALE))


def _finetune_atol(name: str, steps: int) -> float:
    """Sharded vs plain fine-tuning, compared on the logits the tuned heads give their own
    rows: see :func:`tests.tolerances.finetuned_roundings`."""
    forward = tol.model_roundings(name, D, SEQ_LEN, 2, din_hidden=DIN_HIDDEN)
    return float(tol.f32_pair_atol(tol.finetuned_roundings(forward, steps), tol.MODEL_SCALE))


def _batch(rng: np.random.Generator, n: int, seq_len: int, num_items: int) -> np.ndarray:
    lengths = rng.integers(1, seq_len + 1, size=n)
    seq = rng.integers(1, num_items + 1, size=(n, seq_len))
    seq[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0
    return seq.astype(np.int32)


def _check() -> dict:
    """Runs inside the 8-device subprocess; returns what the test asserts on."""
    import jax
    import jax.numpy as jnp

    from duet_jax import finetune
    from duet_jax.duet import Duet
    from duet_jax.models import ModelConfig, get_model

    assert jax.device_count() == FAKE_DEVICES, jax.devices()
    mesh = sharding.device_mesh()
    rng = np.random.default_rng(0)
    out = {"mesh_size": mesh.size, "models": {}}
    for name, low_rank in (("sasrec", 0), ("gru4rec", 0), ("din", 0), ("sasrec", 4)):
        model = get_model(name, ModelConfig(num_items=50, seq_len=SEQ_LEN, embed_dim=D,
                                            num_heads=2, din_hidden=DIN_HIDDEN))
        duet = Duet.create(model, low_rank=low_rank)
        params = duet.init(jax.random.key(1))
        n = 21  # not a multiple of 8: shard_devices pads
        seq = _batch(rng, n, SEQ_LEN, 50)
        plain = jax.jit(duet.generate)(params, jnp.asarray(seq))
        heads = sharding.sharded_generate(duet, mesh)(sharding.replicate(params, mesh),
                                                      sharding.shard_devices(seq, mesh))
        atol = _generate_atol(name)
        gen_close = all(
            np.all(np.abs((np.asarray(a)[:n] if a.shape[0] != b.shape[0] else np.asarray(a))
                          - np.asarray(b)) <= atol)
            for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(plain), strict=True))
        per_device = [h for h, p in zip(jax.tree.leaves(heads), jax.tree.leaves(plain),
                                        strict=True) if h.shape[0] != p.shape[0]]
        gen_split = bool(per_device) and all(sharding.is_split(h, mesh) for h in per_device)
        # the low-rank factors U, V are shared by every device: one whole copy per accelerator
        shared = [h for h, p in zip(jax.tree.leaves(heads), jax.tree.leaves(plain),
                                    strict=True) if h.shape[0] == p.shape[0] != n]
        shared_whole = all(h.sharding.is_fully_replicated for h in shared)

        checks = {"generate_close": bool(gen_close), "generate_split": bool(gen_split),
                  "shared_whole": bool(shared_whole) and (len(shared) > 0) == (low_rank > 0)}
        out["models"][f"{name}/low_rank={low_rank}"] = checks
        if low_rank:
            continue  # fine-tuning does not involve the generator
        # fine-tuning: a group of 12 devices (padded to 16), head mode, 3 Adam steps
        base = model.init(jax.random.key(2))
        g, s = 12, 5
        tune = {
            "click_seq": _batch(rng, g * s, SEQ_LEN, 50).reshape(g, s, SEQ_LEN),
            "target": rng.integers(1, 51, size=(g, s)).astype(np.int32),
            "label": rng.integers(0, 2, size=(g, s)).astype(np.float32),
            "weight": np.ones((g, s), np.float32),
        }
        lr = jnp.float32(1e-2)
        plain_ft = finetune.finetune_params(model, "head", base["head"], base["backbone"],
                                            tune, lr, 3)
        sharded_ft = sharding.sharded_finetune(model, "head", 3, mesh)(
            sharding.replicate(base["head"], mesh), sharding.replicate(base["backbone"], mesh),
            sharding.shard_devices(tune, mesh), lr)
        # compared where it matters, on the logits each device's head gives its own rows
        # (one jitted function for both, so only the heads differ)
        features = jax.vmap(model.encode, in_axes=(None, 0))(base["backbone"], tune)
        logits = jax.jit(jax.vmap(model.head_logits))
        sharded_heads = jax.tree.map(lambda x, g=g: np.asarray(x)[:g], sharded_ft)
        ft_diff = np.abs(np.asarray(logits(sharded_heads, features))
                         - np.asarray(logits(plain_ft, features)))
        ft_close = np.all(ft_diff <= _finetune_atol(name, 3))
        ft_split = all(sharding.is_split(x, mesh) for x in jax.tree.leaves(sharded_ft))
        checks.update(finetune_close=bool(ft_close), finetune_split=bool(ft_split))
    return out


def test_pad_devices_pads_the_leading_axis_with_zeros():
    tree = {"a": np.ones((5, 2), np.float32), "b": np.arange(5)}
    padded = sharding.pad_devices(tree, 4)
    assert padded["a"].shape == (8, 2) and padded["b"].shape == (8,)
    assert (padded["a"][5:] == 0).all() and (padded["b"][:5] == np.arange(5)).all()
    assert sharding.padded_size(8, 4) == 8 and sharding.padded_size(9, 4) == 12


def test_device_mesh_rejects_a_bad_size():
    with pytest.raises(ValueError, match="num_accelerators"):
        sharding.device_mesh(0)


def test_sharded_equals_unsharded_on_8_fake_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={FAKE_DEVICES}"}
    code = "import json, tests.test_sharding as t; print(json.dumps(t._check()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mesh_size"] == FAKE_DEVICES
    for name, checks in result["models"].items():
        assert all(checks.values()), (name, checks)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_process_rows_takes_this_process_share(monkeypatch, index):
    rows = np.arange(12)[:, None] * np.ones((1, 3), np.int32)
    np.testing.assert_array_equal(sharding.process_rows(rows), rows)  # one host: all rows
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 3)
    monkeypatch.setattr(sharding.jax, "process_index", lambda: index)
    np.testing.assert_array_equal(sharding.process_rows(rows), rows[4 * index:4 * index + 4])
    with pytest.raises(ValueError, match="10 rows do not split evenly over 3 processes"):
        sharding.process_rows(rows[:10])


def test_initialize_distributed_passes_the_address_or_leaves_it_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert sharding.initialize_distributed(None, None, None) is False
    assert sharding.initialize_distributed("auto", None, None) is True
    assert sharding.initialize_distributed("h:1", 2, 1) is True
    assert calls == [{}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]
