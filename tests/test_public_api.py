"""The public API: top-level names, any head template through the generator, and a custom
device model registered with ``register_model`` trained through ``Duet``."""

import doctest
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import duet_jax
from duet_jax import ConfigError, Duet, ModelConfig, ParameterGenerator, get_model
from duet_jax import generator as gen_lib
from duet_jax import models as models_lib
from duet_jax.models import layers
from tests.conftest import tiny_batch

# A custom 2-layer MLP head as a plain dict, array and ShapeDtypeStruct leaves mixed, one
# bfloat16 leaf.
MLP_TEMPLATE = {
    "hidden": {"kernel": jnp.zeros((6, 5), jnp.float32), "bias": jnp.zeros((5,), jnp.float32)},
    "out": {
        "kernel": jax.ShapeDtypeStruct((5, 1), jnp.float32),
        "bias": jax.ShapeDtypeStruct((1,), jnp.bfloat16),
    },
}


class MeanPoolMLP:
    """A tiny device model: mean of the sequence's item embeddings and the target's
    embedding, concatenated, through an MLP head ``2D -> 8 -> 1``."""

    def init(self, rng, config):
        k_items, k_head = jax.random.split(rng)
        d = config.embed_dim
        table = layers.embedding_init(k_items, config.num_items + 1, d)
        return {"backbone": {"items": table}, "head": layers.mlp_init(k_head, (2 * d, 8, 1))}

    def embed_sequence(self, backbone, seq):
        return layers.embed(backbone["items"], seq), layers.sequence_mask(seq)

    def encode(self, backbone, batch, config):
        del config
        h, mask = self.embed_sequence(backbone, batch["click_seq"])
        pooled = h.sum(axis=1) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
        target = layers.embed(backbone["items"], batch["target"])
        return jnp.concatenate([pooled, target], axis=-1)

    def head_logits(self, head, features):
        return layers.mlp(head, features, (jnp.tanh, None))[..., 0]

    def apply(self, backbone, head, batch, config):
        return self.head_logits(head, self.encode(backbone, batch, config))


CUSTOM = MeanPoolMLP()
models_lib.register_model("test_mean_pool_mlp", CUSTOM)
CONFIG = ModelConfig(num_items=30, seq_len=5, embed_dim=4)


def _features(rng, n, length=7, dim=4):
    features = rng.normal(size=(n, length, dim)).astype(np.float32)
    mask = np.arange(length)[None] < rng.integers(0, length + 1, size=n)[:, None]
    return features, mask


def _assert_heads_like(heads, template, n):
    assert jax.tree.structure(heads) == jax.tree.structure(template)
    for leaf, spec in zip(jax.tree.leaves(heads), jax.tree.leaves(template), strict=True):
        assert leaf.shape == (n, *spec.shape) and leaf.dtype == spec.dtype


# ------------------------------------------------------------------------ top level


def test_top_level_exports_resolve_and_load_lazily():
    assert set(duet_jax.__all__) == set(duet_jax._EXPORTS)
    for name in duet_jax.__all__:
        assert getattr(duet_jax, name) is not None, name
        assert name in dir(duet_jax)
    assert duet_jax.HeadSpec is duet_jax.paramspec.HeadSpec
    assert duet_jax.register_model is models_lib.register_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = duet_jax.nope
    # `import duet_jax` alone loads neither JAX nor the training stack
    code = "import sys, duet_jax; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


MODULES_WITH_EXAMPLES = [
    "duet_jax",
    "duet_jax.duet",
    "duet_jax.generator",
    "duet_jax.lowrank",
    "duet_jax.models",
    "duet_jax.models.config",
    "duet_jax.models.layers",
    "duet_jax.paramspec",
]


@pytest.mark.parametrize("module", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(module):
    mod = sys.modules.get(module) or __import__(module, fromlist=["_"])
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


# ------------------------------------------------------------------ any head template


@pytest.mark.parametrize("build", ["spec", "for_head"])
def test_plain_dict_template_goes_through_the_generator(rng, build):
    options = {"hidden_dim": 6, "z_dim": 5}
    if build == "spec":
        gen = ParameterGenerator(spec=MLP_TEMPLATE, **options)
    else:
        gen = ParameterGenerator.for_head(MLP_TEMPLATE, **options)
    assert isinstance(gen.spec, duet_jax.HeadSpec)
    assert gen.spec == duet_jax.HeadSpec.from_template(MLP_TEMPLATE)
    params = duet_jax.init_generator(gen, jax.random.key(0), 7, 4)
    features, mask = _features(rng, 3)
    heads = jax.jit(functools.partial(duet_jax.generate, gen))(params, features, mask)
    _assert_heads_like(heads, MLP_TEMPLATE, 3)
    assert type(heads) is dict and type(heads["out"]) is dict  # not Flax's FrozenDict


def test_template_lists_stay_lists(rng):
    template = {"layers": [jnp.zeros((3, 2)), jnp.zeros((2,))]}
    gen = ParameterGenerator(spec=template, hidden_dim=4, z_dim=4)
    params = duet_jax.init_generator(gen, jax.random.key(0), 7, 4)
    heads = duet_jax.generate(gen, params, *_features(rng, 2))
    _assert_heads_like(heads, template, 2)


def test_bad_templates_are_refused_naming_the_leaf():
    with pytest.raises(ValueError, match=r"leaf 'out/bias' is a float .*\.shape and \.dtype"):
        ParameterGenerator.for_head({"out": {"bias": 1.0}})
    with pytest.raises(ValueError, match=r"leaf 'w' has dtype int32: .* floating-point"):
        ParameterGenerator(spec={"w": jnp.zeros((2, 2), jnp.int32)})
    with pytest.raises(ValueError, match="no leaves"):
        ParameterGenerator(spec={})


# ------------------------------------------------------------- a registered model


def test_custom_model_trains_through_duet(rng):
    model = get_model("test_mean_pool_mlp", CONFIG)
    assert model.impl is CUSTOM
    duet = Duet.create(model, hidden_dim=6, z_dim=5)
    params = duet.init(jax.random.key(0))
    batch = tiny_batch(rng, 6, CONFIG.seq_len, CONFIG.num_items)
    heads = jax.jit(duet.generate)(params, batch["trigger_seq"])
    _assert_heads_like(heads, model.head_template(), 6)

    def loss(p):
        logits = duet.apply(p, batch)
        return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()

    opt = optax.adam(1e-2)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates, _ = opt.update(grads, opt.init(params))
    new = optax.apply_updates(params, updates)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new))
    assert all(moved)  # the backbone and every generator tensor take the step
    logits = jax.jit(duet.apply)(new, batch)
    assert logits.shape == (6,) and np.all(np.isfinite(logits))


def test_duet_takes_a_generator_built_from_a_plain_dict_template():
    model = get_model("test_mean_pool_mlp", CONFIG)
    d = CONFIG.embed_dim
    template = {  # the model's head, written by hand
        "dense1": {"kernel": jnp.zeros((2 * d, 8)), "bias": jnp.zeros((8,))},
        "dense2": {"kernel": jnp.zeros((8, 1)), "bias": jnp.zeros((1,))},
    }
    duet = Duet(model, ParameterGenerator.for_head(template, hidden_dim=6, z_dim=5))
    params = duet.init(jax.random.key(1))
    batch = tiny_batch(np.random.default_rng(1), 4, CONFIG.seq_len, CONFIG.num_items)
    assert np.all(np.isfinite(duet.apply(params, batch)))
    with pytest.raises(ValueError, match=r"ParameterGenerator\.for_head"):
        Duet(model, ParameterGenerator.for_head(MLP_TEMPLATE))


class _MissingEncode:
    def init(self, rng, config): ...
    def embed_sequence(self, backbone, seq): ...
    def head_logits(self, head, features): ...
    def apply(self, backbone, head, batch, config): ...


class _NoConfig(_MissingEncode):
    def encode(self, backbone, batch): ...  # the protocol passes config too


@pytest.mark.parametrize(
    "name,model,match",
    [
        ("", CUSTOM, "non-empty string"),
        ("a b", CUSTOM, "without whitespace"),
        (3, CUSTOM, "non-empty string"),
        ("x", _MissingEncode(), r"no callable encode\(backbone, batch, config\)"),
        ("x", _NoConfig(), r"encode\(backbone, batch\) cannot be called as encode\(backbone, "),
        ("x", MeanPoolMLP, r"register an instance, not the class"),
        ("sasrec", CUSTOM, "taken by the built-in model 'sasrec'; pass replace=True"),
        ("test_mean_pool_mlp", MeanPoolMLP(), "taken by another model"),
    ],
)
def test_bad_registration_is_refused(name, model, match):
    before = dict(models_lib.MODELS)
    with pytest.raises(ValueError, match=match):
        models_lib.register_model(name, model)
    assert dict(models_lib.MODELS) == before


def test_registration_replaces_only_when_asked_and_lists_new_names():
    models_lib.register_model("test_mean_pool_mlp", CUSTOM)  # the same model again: no-op
    assert models_lib.MODELS["test_mean_pool_mlp"] is CUSTOM
    with pytest.raises(TypeError):
        models_lib.MODELS["other"] = CUSTOM  # read-only: register_model is the way in
    other = MeanPoolMLP()
    try:
        models_lib.register_model("test_mean_pool_mlp", other, replace=True)
        assert get_model("test_mean_pool_mlp", CONFIG).impl is other
    finally:
        models_lib.register_model("test_mean_pool_mlp", CUSTOM, replace=True)
    with pytest.raises(ConfigError, match=r"config\.model='bert4rec'.*'test_mean_pool_mlp'"):
        get_model("bert4rec", CONFIG)


def test_generator_module_keeps_the_head_spec_for_advanced_use():
    spec = duet_jax.HeadSpec.from_template(MLP_TEMPLATE)
    gen = gen_lib.ParameterGenerator(spec=spec, hidden_dim=6, z_dim=5)
    assert gen.spec is spec and spec.num_values == 6 * 5 + 5 + 5 + 1
