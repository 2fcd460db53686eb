import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from duet_jax import generator as gen_lib
from duet_jax.duet import Duet
from duet_jax.lowrank import LowRankKernel
from duet_jax.models import ModelConfig, get_model
from duet_jax.paramspec import HeadSpec
from tests import numpy_reference as ref
from tests import tolerances as tol
from tests.conftest import tiny_batch

# A head unlike any device model's: nested tuple, a scalar, a 3-d leaf, a bfloat16 leaf.
ODD_TEMPLATE = {
    "gate": jax.ShapeDtypeStruct((), jnp.float32),
    "layers": (
        {
            "kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32),
            "bias": jax.ShapeDtypeStruct((3,), jnp.bfloat16),
        },
        {"cube": jax.ShapeDtypeStruct((2, 3, 2), jnp.float32)},
    ),
}


def _generator(template, **kw):
    return gen_lib.ParameterGenerator(
        spec=HeadSpec.from_template(template), hidden_dim=6, z_dim=5, **kw
    )


def _generator_roundings(stabiliser: int = 0) -> int:
    """:func:`_generator` on :func:`_inputs`: 7 GRU steps over 4 features, hidden 6, z 5; the
    largest ODD_TEMPLATE leaf has 12 values (the stabiliser's row length, at most)."""
    return tol.generator_roundings(7, 4, 6, 5, stabiliser=(stabiliser, 12))


def _inputs(rng, n, length=7, dim=4):
    features = rng.normal(size=(n, length, dim)).astype(np.float32)
    lengths = rng.integers(0, length + 1, size=n)
    lengths[0] = 0
    return features, np.arange(length)[None] < lengths[:, None], lengths


@pytest.mark.parametrize("decoder_init", gen_lib.DECODER_INITS)
def test_generated_head_has_template_structure_shapes_dtypes(rng, decoder_init):
    gen = _generator(ODD_TEMPLATE, decoder_init=decoder_init)
    params = gen_lib.init_generator(gen, jax.random.key(0), 7, 4)
    features, mask, _ = _inputs(rng, 9)
    heads = jax.jit(functools.partial(gen_lib.generate, gen))(params, features, mask)
    assert jax.tree.structure(heads) == jax.tree.structure(ODD_TEMPLATE)
    for leaf, spec in zip(jax.tree.leaves(heads), jax.tree.leaves(ODD_TEMPLATE), strict=True):
        assert leaf.shape == (9, *spec.shape)
        assert leaf.dtype == spec.dtype


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "din"])
def test_model_heads_match_templates(name, rng):
    model = get_model(name, ModelConfig(num_items=30, seq_len=5, embed_dim=8, num_heads=2))
    duet = Duet.create(model)
    params = duet.init(jax.random.key(0))
    seq = tiny_batch(rng, 6, 5, 30)["click_seq"]
    heads = jax.jit(duet.generate)(params, seq)
    duet.spec.check(heads, batch_ndim=1)
    assert jax.tree.leaves(heads)[0].shape[0] == 6


# below and above the device count from which the decoders fold their bias into the matmul
DEVICE_COUNTS = [6, gen_lib.FOLD_BIAS_MIN_DEVICES + 2]


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("options", [{}, {"stabiliser": 3}, {"low_rank": 2}])
def test_batched_generation_equals_python_loop(rng, n, options):
    gen = _generator(ODD_TEMPLATE, **options)
    params = gen_lib.init_generator(gen, jax.random.key(1), 7, 4)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    features, mask, _ = _inputs(rng, n)
    batched = jax.jit(functools.partial(gen_lib.generate, gen))(params, features, mask)
    single = jax.jit(gen.apply)
    is_leaf = lambda x: isinstance(x, LowRankKernel)
    atol = tol.f32_pair_atol(_generator_roundings(options.get("stabiliser", 0)), tol.MODEL_SCALE)
    for i in range(n):
        one = single(params, features[i], mask[i])
        for a, b in zip(jax.tree.leaves(batched, is_leaf), jax.tree.leaves(one, is_leaf),
                        strict=True):
            if isinstance(a, LowRankKernel):  # shared factors once, the core per device
                # exact: U and V are decoder parameters, passed through untouched
                np.testing.assert_array_equal(a.u, b.u)
                np.testing.assert_array_equal(a.v, b.v)
                a, b = a.core, b.core
            # batched vs one device: other shapes, so other summation orders
            tol.assert_leaf_within(a[i], b, atol, f"device {i}")


@pytest.mark.parametrize("softmax_over", ["candidates", "rows"])
def test_decode_maps_over_several_leading_device_axes(rng, softmax_over):
    gen = _generator(ODD_TEMPLATE, stabiliser=2, stabiliser_softmax=softmax_over)
    params = gen_lib.init_generator(gen, jax.random.key(3), 7, 4)
    z = rng.normal(size=(2, 3, gen.z_dim)).astype(np.float32)
    decode = lambda v: gen.apply(params, v, method=gen_lib.ParameterGenerator.decode)
    grid = jax.jit(decode)(z)
    # the decoders alone (z given) with M = 2 candidates of at most 12 values, two float32
    # evaluations of other shapes
    n = tol.path_roundings(gen.z_dim + 1, 12, 2, 2 * 2)
    atol = tol.f32_pair_atol(n, tol.MODEL_SCALE)
    for i in range(2):
        for j in range(3):
            one = decode(z[i, j])
            for a, b in zip(jax.tree.leaves(grid), jax.tree.leaves(one), strict=True):
                assert a.shape == (2, 3, *b.shape)
                tol.assert_leaf_within(a[i, j], b, atol, f"device {i, j}")


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_affine_matches_float64_reference(rng, n):
    z = rng.normal(size=(n, 5)).astype(np.float32)
    kernel = rng.normal(size=(5, 300)).astype(np.float32)
    bias = rng.normal(size=(300,)).astype(np.float32)
    want = z.astype(np.float64) @ kernel.astype(np.float64) + bias
    got = jax.jit(gen_lib.affine)(z, kernel, bias)
    assert got.shape == (n, 300)
    # a dot of 5 products plus the bias, per element: gamma(6) (|z| |kernel| + |bias|)
    tol.assert_within(got, want, tol.matmul_atol(6, z, kernel, bias=bias), "z @ kernel + bias")


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_affine_folds_the_bias_only_from_the_threshold(rng, n):
    z = rng.normal(size=(n, 5)).astype(np.float32)
    kernel = rng.normal(size=(5, 30)).astype(np.float32)
    bias = rng.normal(size=(30,)).astype(np.float32)
    jaxpr = str(jax.make_jaxpr(gen_lib.affine)(z, kernel, bias))
    assert ("concatenate" in jaxpr) == (n >= gen_lib.FOLD_BIAS_MIN_DEVICES)
    # and its gradients are the plain form's, whichever form runs
    weights = rng.normal(size=(n, 30)).astype(np.float32)
    folded = jax.grad(lambda *a: (gen_lib.affine(*a) * weights).sum(), argnums=(0, 1, 2))
    plain = jax.grad(lambda z, k, b: ((z @ k + b) * weights).sum(), argnums=(0, 1, 2))
    # two float32 evaluations per gradient, elementwise: d/dz = weights @ kernel^T (30
    # terms), d/dkernel = z^T @ weights and d/dbias = 1^T @ weights (n terms each)
    bounds = (
        tol.matmul_atol(30, weights, kernel.T, pair=True),
        tol.matmul_atol(n, z.T, weights, pair=True),
        tol.matmul_atol(n, np.ones(n), weights, pair=True),
    )
    for a, b, bound, what in zip(folded(z, kernel, bias), plain(z, kernel, bias), bounds,
                                 ("z", "kernel", "bias"), strict=True):
        tol.assert_within(a, b, bound, f"d/d{what}")


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_generator_matches_numpy_reference(rng, n):
    template = {
        "dense": {
            "kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32),
            "bias": jax.ShapeDtypeStruct((3,), jnp.float32),
        }
    }
    gen = _generator(template, decoder_init="fmod_normal")
    params = gen_lib.init_generator(gen, jax.random.key(2), 7, 4)
    features, mask, lengths = _inputs(rng, n)
    heads = gen_lib.generate(gen, params, features, mask)
    # float32 vs the float64 reference on the same (float32) parameters and features
    atol = tol.f32_atol(_generator_roundings(), tol.MODEL_SCALE)
    for i in range(n):
        want = ref.generator(params, features[i], lengths[i], gen.spec.paths, gen.spec.shapes)
        tol.assert_within(heads["dense"]["kernel"][i], want["dense/kernel"], atol, "kernel")
        tol.assert_within(heads["dense"]["bias"][i], want["dense/bias"], atol, "bias")


def test_fmod_normal_init_lies_in_open_interval():
    gen = _generator(ODD_TEMPLATE, decoder_init="fmod_normal")
    params = gen_lib.init_generator(gen, jax.random.key(3), 7, 4)["params"]
    decoders = [v for k, v in params.items() if k.startswith("decoder_")]
    values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(decoders)])
    assert np.abs(values).max() < 2.0 and values.std() > 0.5


def test_glorot_init_starts_biases_at_zero_and_kernels_small():
    gen = _generator(ODD_TEMPLATE)
    params = gen_lib.init_generator(gen, jax.random.key(3), 7, 4)["params"]
    bias_dec = params[gen_lib.decoder_name("layers/0/bias")]
    assert np.all(bias_dec["kernel"] == 0) and np.all(bias_dec["bias"] == 0)
    kernel_dec = params[gen_lib.decoder_name("layers/0/kernel")]
    # a sample std of 60 normal draws (sampling error ~10%), not a float rounding question
    np.testing.assert_allclose(kernel_dec["kernel"].std(), np.sqrt(2 / (7 * 5)), rtol=0.5)


@pytest.mark.parametrize("rows", DEVICE_COUNTS)
@pytest.mark.parametrize("decoders,moves", [("frozen", False), ("trained", True)])
def test_frozen_decoders_never_move_under_training(decoders, moves, rows, rng):
    model = get_model("gru4rec", ModelConfig(num_items=30, seq_len=5, embed_dim=8))
    duet = Duet.create(model, decoders=decoders)
    params = duet.init(jax.random.key(0))
    opt = optax.adam(1e-2)
    state = opt.init(params)
    batch = tiny_batch(rng, rows, 5, 30)

    def loss(p):
        return optax.sigmoid_binary_cross_entropy(duet.apply(p, batch), batch["label"]).mean()

    @jax.jit  # one compilation instead of op-by-op dispatch of every step (tens of seconds)
    def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    new = params
    for _ in range(3):
        new, state = step(new, state)
    for key, before in params["generator"]["params"].items():
        after = new["generator"]["params"][key]
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )
        assert changed == (moves or key == "encoder"), key


def test_auto_init_follows_the_decoder_mode():
    assert gen_lib.resolve_decoder_init("trained", "auto") == "glorot"
    assert gen_lib.resolve_decoder_init("frozen", "auto") == "fmod_normal"
    with pytest.raises(ValueError, match="biases would stay zero"):
        gen_lib.resolve_decoder_init("frozen", "glorot")


def test_frozen_auto_decoders_generate_nonzero_biases(rng):
    gen = _generator(ODD_TEMPLATE, decoders="frozen")
    params = gen_lib.init_generator(gen, jax.random.key(0), 7, 4)
    features, mask, _ = _inputs(rng, 3)
    heads = gen_lib.generate(gen, params, features, mask)
    assert np.abs(np.asarray(heads["layers"][0]["bias"], np.float32)).min() > 0


def test_bad_generator_option_raises():
    with pytest.raises(ValueError, match="decoders"):
        gen_lib.init_generator(
            _generator(ODD_TEMPLATE, decoders="sometimes"), jax.random.key(0), 7, 4
        )
