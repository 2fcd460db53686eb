import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax.paramspec import HeadSpec

TEMPLATE = {
    "b": (jnp.zeros((2, 3), jnp.float32), jnp.zeros((4,), jnp.bfloat16)),
    "a": {"w": jnp.zeros((3, 1, 2), jnp.float32), "s": jnp.zeros((), jnp.float32)},
}


def test_spec_reads_paths_shapes_dtypes_in_tree_order():
    spec = HeadSpec.from_template(TEMPLATE)
    assert spec.paths == ("a/s", "a/w", "b/0", "b/1")
    assert spec.shapes == ((), (3, 1, 2), (2, 3), (4,))
    assert spec.dtypes[-1] == jnp.bfloat16
    assert spec.num_values == 1 + 6 + 6 + 4
    assert spec.num_bytes == 4 * (1 + 6 + 6) + 2 * 4


def test_flatten_unflatten_round_trip_with_batch_axis(rng):
    spec = HeadSpec.from_template(TEMPLATE)
    tree = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=(5, *t.shape)), t.dtype), TEMPLATE)
    flat = spec.flatten(tree, batch_ndim=1)
    assert flat.shape == (5, spec.num_values)
    back = spec.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(TEMPLATE)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_check_names_the_mismatching_leaf():
    spec = HeadSpec.from_template(TEMPLATE)
    bad = jax.tree.map(lambda t: t, TEMPLATE)
    bad["a"]["w"] = jnp.zeros((3, 2, 2))
    with pytest.raises(ValueError, match="a/w"):
        spec.check(bad)


def test_template_round_trips_to_shape_dtype_structs():
    spec = HeadSpec.from_template(TEMPLATE)
    assert HeadSpec.from_template(spec.template()) == spec
