"""Each device model's apply equals the hand-written numpy reference on tiny inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.errors import ConfigError
from duet_jax.models import ModelConfig, get_model
from tests import numpy_reference as ref
from tests import tolerances as tol
from tests.conftest import tiny_batch

CONFIG = ModelConfig(num_items=20, seq_len=6, embed_dim=8, num_heads=2, din_hidden=(12, 5))


def _roundings(name: str) -> int:
    return tol.model_roundings(name, CONFIG.embed_dim, CONFIG.seq_len, CONFIG.num_heads,
                               CONFIG.ffn_mult, CONFIG.din_hidden)


def _perturbed(params, rng):
    """Non-zero biases and a live padding-free table, so every parameter matters."""
    return jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape).astype(np.float32), params)


def _reference(name, backbone, head, batch, config):
    if name == "sasrec":
        return ref.sasrec(
            backbone,
            head,
            batch["click_seq"],
            batch["target"],
            config.num_heads,
            config.mask_padding,
        )
    fn = {"gru4rec": ref.gru4rec, "din": ref.din}[name]
    return fn(backbone, head, batch["click_seq"], batch["target"])


@pytest.mark.parametrize(
    "name,mask_padding",
    [("sasrec", False), ("sasrec", True), ("gru4rec", False), ("din", False)],
)
def test_apply_matches_numpy_reference(name, mask_padding, rng):
    config = ModelConfig(**{**CONFIG.__dict__, "mask_padding": mask_padding})
    model = get_model(name, config)
    params = _perturbed(model.init(jax.random.key(0)), rng)
    batch = tiny_batch(rng, 5, config.seq_len, config.num_items)
    got = np.asarray(model.apply(params["backbone"], params["head"], batch))
    want = _reference(name, params["backbone"], params["head"], batch, config)
    assert got.shape == (5,)
    # float32 vs float64 on the same float32 parameters: the model's longest path
    tol.assert_within(got, want, tol.f32_atol(_roundings(name), tol.MODEL_SCALE), name)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "din"])
def test_per_example_heads_match_reference_and_broadcast_head(name, rng):
    model = get_model(name, CONFIG)
    params = _perturbed(model.init(jax.random.key(0)), rng)
    batch = tiny_batch(rng, 4, CONFIG.seq_len, CONFIG.num_items)
    heads = jax.tree.map(
        lambda h: np.stack([h + 0.3 * rng.normal(size=h.shape) for _ in range(4)]).astype(
            np.float32
        ),
        params["head"],
    )
    got = np.asarray(model.apply(params["backbone"], heads, batch))
    atol = tol.f32_atol(_roundings(name), tol.MODEL_SCALE)  # float32 vs float64, as above
    tol.assert_within(got, _reference(name, params["backbone"], heads, batch, CONFIG), atol,
                      f"{name}, per-example heads")
    tiled = jax.tree.map(lambda h: jnp.broadcast_to(h, (4, *h.shape)), params["head"])
    # a per-example head runs a batched matmul, a shared one a plain matmul: two float32
    # evaluations in other orders
    tol.assert_within(
        model.apply(params["backbone"], tiled, batch),
        model.apply(params["backbone"], params["head"], batch),
        tol.f32_pair_atol(_roundings(name), tol.MODEL_SCALE),
        f"{name}, tiled vs shared head",
    )


@pytest.mark.parametrize("name,size", [("sasrec", 2112), ("gru4rec", 2112), ("din", 16641)])
def test_head_sizes_at_authors_dimensions(name, size):
    model = get_model(name, ModelConfig(num_items=10))
    template = model.head_template()
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(template)) == size


def test_init_is_xavier_with_zero_biases_and_zero_padding_row():
    params = get_model("sasrec", CONFIG).init(jax.random.key(0))
    assert np.all(params["head"]["dense1"]["bias"] == 0)
    bound = np.sqrt(6 / (8 + 8))
    assert np.abs(params["head"]["dense1"]["kernel"]).max() <= bound
    np.testing.assert_array_equal(params["backbone"]["item_embedding"][0], 0.0)


def test_unknown_model_names_the_field():
    with pytest.raises(ConfigError, match=r"config\.model='bert4rec'"):
        get_model("bert4rec", CONFIG)


@pytest.mark.parametrize("field,value", [("seq_len", 0), ("embed_dim", 0), ("num_heads", 3)])
def test_bad_model_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**CONFIG.__dict__, field: value})


def test_sasrec_rejects_sequences_of_another_length(rng):
    model = get_model("sasrec", CONFIG)
    params = model.init(jax.random.key(0))
    batch = tiny_batch(rng, 2, CONFIG.seq_len - 1, CONFIG.num_items)
    with pytest.raises(ValueError, match="sequence length 5 != the model's seq_len 6"):
        model.apply(params["backbone"], params["head"], batch)
