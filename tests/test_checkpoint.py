import jax
import jax.numpy as jnp
import numpy as np
import optax

from duet_jax.checkpoint import Checkpointer


def test_restore_keeps_optax_state_types_and_values(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    _, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"params": params, "opt": state}, {"note": "x", "history": [1, 2]})
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 5
        target = {"params": params, "opt": opt.init(params)}
        restored, meta = ckpt.restore(target)
    assert meta == {"note": "x", "history": [1, 2]}
    assert type(restored["opt"][0]) is type(state[0])  # ScaleByAdamState, not a dict
    for a, b in zip(
        jax.tree.leaves(restored), jax.tree.leaves({"params": params, "opt": state}), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_keeps_only_the_latest_checkpoints(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"x": jnp.full(2, step)}, {})
        assert ckpt.latest_step() == 3
        restored, _ = ckpt.restore({"x": jnp.zeros(2)}, step=2)
    np.testing.assert_array_equal(restored["x"], [2, 2])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
