import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import delivery
from duet_jax.models import ModelConfig, get_model
from duet_jax.paramspec import HeadSpec
from tests import tolerances as tol
from tests.test_generator import ODD_TEMPLATE

SASREC_SPEC = HeadSpec.from_template(get_model("sasrec", ModelConfig(num_items=10)).head_template())


def _heads(spec: HeadSpec, rng, n: int, scale: float = 1.0):
    """``n`` random heads with per-device, per-leaf magnitudes (so int8 scales differ)."""
    leaves = []
    for shape, dtype in zip(spec.shapes, spec.dtypes, strict=True):
        mag = rng.uniform(0.01, 3.0, size=(n,) + (1,) * len(shape)) * scale
        leaves.append(jnp.asarray(mag * rng.normal(size=(n, *shape)), dtype))
    return spec.unflatten_leaves(leaves)


def test_payload_bytes_are_leaf_sizes_times_width():
    # SASRec/GRU4Rec head at D = 32: 2 x (32 x 32 + 32) = 2,112 values in 4 leaves.
    assert SASREC_SPEC.num_values == 2112 and len(SASREC_SPEC.sizes) == 4
    assert delivery.payload_bytes(SASREC_SPEC, "float32") == 4 * 2112
    assert delivery.payload_bytes(SASREC_SPEC, "bfloat16") == 2 * 2112
    assert delivery.payload_bytes(SASREC_SPEC, "int8") == 2112 + 4 * 4


@pytest.mark.parametrize("fmt", delivery.FORMATS)
@pytest.mark.parametrize("template", [SASREC_SPEC.template(), ODD_TEMPLATE], ids=["sasrec", "odd"])
def test_payload_arrays_hold_exactly_the_counted_bytes(fmt, template, rng):
    spec = HeadSpec.from_template(template)
    payload = delivery.encode(spec, _heads(spec, rng, 3), fmt)
    sent = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(payload))
    assert sent == 3 * delivery.payload_bytes(spec, fmt)
    widths = {np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(payload)}
    assert widths == ({1, 4} if fmt == "int8" else {delivery.WIDTH[fmt]})


def test_float32_round_trip_is_exact(rng):
    heads = _heads(SASREC_SPEC, rng, 4)
    back = delivery.round_trip(SASREC_SPEC, heads, "float32")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(heads), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_round_trip_within_half_an_ulp(rng):
    heads = _heads(SASREC_SPEC, rng, 4)
    back = delivery.round_trip(SASREC_SPEC, heads, "bfloat16")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(heads), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float32
        # one IEEE rounding to 8 significant bits: at most half a spacing, 2**-8 relative
        assert np.all(np.abs(a - b) <= tol.BF16_ULP / 2 * np.abs(b))


@pytest.mark.parametrize("template", [SASREC_SPEC.template(), ODD_TEMPLATE], ids=["sasrec", "odd"])
def test_int8_round_trip_within_half_a_scale_per_leaf(template, rng):
    spec = HeadSpec.from_template(template)
    heads = _heads(spec, rng, 6)
    back = jax.jit(lambda h: delivery.round_trip(spec, h, "int8"))(heads)
    bounds = delivery.int8_tolerance(spec, heads)
    for a, b, bound, dtype in zip(
        jax.tree.leaves(back), jax.tree.leaves(heads), jax.tree.leaves(bounds), spec.dtypes,
        strict=True,
    ):
        assert a.dtype == dtype
        a, b, bound = (np.asarray(x, np.float32) for x in (a, b, bound))
        err = np.abs(a - b).reshape(len(a), -1).max(axis=1)
        top = np.abs(b).reshape(len(b), -1).max(axis=1)
        # scale / 2 per device, plus float32 rounding of scale = max / 127, x / scale,
        # q * scale and the bound itself (4 roundings, relative to max|x|); a bfloat16 leaf
        # also rounds the decoded value to bfloat16 (half a spacing, relative)
        slack = tol.f32_atol(4, 1.0) + (tol.BF16_ULP / 2 if dtype == jnp.bfloat16 else 0.0)
        assert np.all(err <= bound + slack * top)
        if a.ndim > 1 and dtype == jnp.float32:
            assert np.all(err > 0)  # it really is lossy: the bound is not vacuous

def test_int8_keeps_an_all_zero_leaf_exact_and_uses_symmetric_range():
    spec = SASREC_SPEC
    leaves = [jnp.zeros((2, *s)) for s in spec.shapes]
    leaves[1] = leaves[1].at[0].set(jnp.linspace(-5.0, 5.0, spec.sizes[1]).reshape(spec.shapes[1]))
    payload = delivery.encode(spec, spec.unflatten_leaves(leaves), "int8")
    parts = spec.treedef.flatten_up_to(payload)
    # max|x| = 5 exactly (a linspace end point), then one float32 division (<= 2 roundings)
    assert float(parts[1]["scale"][0]) == pytest.approx(5.0 / 127, rel=tol.f32_atol(2, 1.0))
    assert int(parts[1]["q"].min()) == -127 and int(parts[1]["q"].max()) == 127
    back = delivery.decode(spec, payload, "int8")
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(back)[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(back)[1][1]), 0.0)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="float16"):
        delivery.payload_bytes(SASREC_SPEC, "float16")
