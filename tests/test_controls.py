"""The controls that could prove DUET wrong: base_wide (DUET's size and inputs, a static
head), and the test-time scorings duet_shuffled and duet_mean of a trained DUET."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from duet_jax import controls
from duet_jax.data.samples import SampleSet, Splits
from duet_jax.duet import Duet
from duet_jax.methods import (
    DUET_VARIANTS,
    DuetOptions,
    get_method,
    method_spec,
    score_at_test_time,
)
from duet_jax.models import ModelConfig, get_model
from duet_jax.training import (
    TrainConfig,
    TrainState,
    make_train_step,
    predict,
    train_and_evaluate,
)
from tests import tolerances as tol
from tests.conftest import tiny_batch

MODELS = ("sasrec", "gru4rec", "din")
DEFAULT = ModelConfig(num_items=1000)
TINY = ModelConfig(num_items=150, seq_len=10, embed_dim=8, num_heads=2, din_hidden=(16, 8))
PER = 3  # rows per position: a positive and two negatives sharing its trigger


def _samples(rng, rows: dict[int, int], config: ModelConfig = TINY) -> SampleSet:
    """Device ``u`` gets ``rows[u]`` positions, each a positive and PER - 1 negatives
    sharing one trigger (= click sequence, as with sync_every=1), stored device by device."""
    users, seqs = [], []
    for user, n in rows.items():
        users.append(np.full(n, user, np.int32))
        seqs.append(tiny_batch(rng, max(n, 2), config.seq_len, config.num_items)["click_seq"][:n])
    user, seq = np.concatenate(users), np.concatenate(seqs)
    n = len(user)
    return SampleSet(
        user=np.repeat(user, PER),
        click_seq=np.repeat(seq, PER, axis=0),
        trigger_seq=np.repeat(seq, PER, axis=0),
        target=rng.integers(1, config.num_items + 1, n * PER).astype(np.int32),
        label=np.tile(np.eye(1, PER, dtype=np.float32)[0], n),
    )


def _batch(samples: SampleSet) -> dict:
    return {**samples.arrays(), "weight": np.ones(len(samples), np.float32)}


def test_count_params_counts_arrays_and_shape_structs():
    tree = {"a": jnp.zeros((2, 3)), "b": [jax.ShapeDtypeStruct((4,), jnp.float32)], "c": ()}
    assert controls.count_params(tree) == 10


@pytest.mark.parametrize("config", [DEFAULT, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("name", MODELS)
def test_base_wide_has_duets_parameter_count(name, config):
    model = get_model(name, config)
    for options in ({}, DuetOptions().generator_kwargs()):  # Duet.create's and the configs'
        counts = controls.param_counts(model, **options)
        assert abs(counts["base_wide"] - counts["duet"]) <= 0.1 * counts["duet"], counts
        assert counts["base"] < counts["base_wide"]
        # the registry builds base_wide with the same options to the same size
        method = get_method("base_wide", model, **options)
        shapes = jax.eval_shape(method.init, jax.random.key(0))
        assert controls.count_params(shapes) == counts["base_wide"]


def test_base_wide_refuses_a_duet_it_cannot_match():
    # a rank-1 generator is smaller than DIN's static head plus the extra encoder
    with pytest.raises(ValueError, match="not within 10% of DUET's"):
        controls.WideBase.create(get_model("din", DEFAULT), low_rank=1)


@pytest.mark.parametrize("name", MODELS)
def test_base_wide_has_a_static_head_reads_the_trigger_and_trains(name, rng):
    model = get_model(name, TINY)
    method = get_method("base_wide", model)
    params = method.init(jax.random.key(0))
    # one static head: the template's shapes, no per-sample axis, and no generator
    assert sorted(params) == ["backbone", "encoder", "head", "z_mlp"]
    assert jax.tree.map(lambda x: x.shape, params["head"]) == jax.tree.map(
        lambda x: x.shape, model.head_template())
    batch = _batch(_samples(rng, {0: 5, 1: 4, 2: 6}))
    logits = jax.jit(method.logits)
    # base_wide starts as Base from the same key (the same backbone and head, and a z-MLP
    # whose output layer is zero): only XLA's summation order may differ between the two
    # programs (both the device model's longest path in float32; the added zero is exact)
    base_params = get_method("base", model).init(jax.random.key(0))
    assert jax.tree.all(jax.tree.map(np.array_equal, base_params,
                                     {k: params[k] for k in ("backbone", "head")}))
    roundings = tol.model_roundings(name, TINY.embed_dim, TINY.seq_len, TINY.num_heads,
                                    TINY.ffn_mult, TINY.din_hidden)
    base = jax.jit(model.apply)(base_params["backbone"], base_params["head"], batch)
    tol.assert_within(logits(params, batch), base, tol.f32_pair_atol(roundings, tol.MODEL_SCALE),
                      f"{name}: base_wide at init vs Base")

    step = make_train_step(method.logits, optax.adam(1e-2))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                       opt_state=optax.adam(1e-2).init(params))
    state, loss = step(state, batch)
    assert np.isfinite(float(loss))
    trained = state.params
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                         trained["z_mlp"], params["z_mlp"]))
    assert any(moved)
    # Change the trigger, nothing else: a model that did not read it would run the same
    # jitted computation on the same values and give bitwise the same logits
    other = {**batch, "trigger_seq": np.roll(batch["trigger_seq"], PER, axis=0)}
    assert not np.array_equal(logits(trained, batch), logits(trained, other))


def test_base_wide_trains_through_train_and_evaluate(rng, tmp_path):
    model = get_model("gru4rec", TINY)
    counts = {u: 4 for u in range(12)}
    data = Splits(train=_samples(rng, counts), val=_samples(rng, counts),
                  test=_samples(rng, counts), num_users=12, num_items=TINY.num_items)
    train = TrainConfig(batch_size=32, eval_batch_size=64, num_epochs=1, progress=False)
    result = train_and_evaluate(get_method("base_wide", model), data, train, str(tmp_path), 0)
    assert np.isfinite(result.history[0]["train_loss"])
    assert 0.0 <= result.test["auc"] <= 1.0


def test_the_registry_lists_the_controls():
    wide = method_spec("base_wide")
    assert (wide.kind, wide.generator_of, wide.uses_generator) == ("trained", "duet", False)
    assert "base_wide" not in DUET_VARIANTS
    model = get_model("sasrec", TINY)
    for name in ("duet_shuffled", "duet_mean"):
        spec = method_spec(name)
        assert (spec.kind, spec.evaluates) == ("test_time", "duet")
        with pytest.raises(ValueError, match="score_at_test_time"):
            get_method(name, model)
    with pytest.raises(ValueError, match="not a test-time method"):
        score_at_test_time("duet", None, None, None, reference=None, seed=0, batch_size=1)


# ---------------------------------------------------------------------------------------------
# duet_shuffled


def test_donor_rows_come_from_another_device_of_the_split_deterministically(rng):
    # devices of unequal row counts, one row set interleaved out of device order
    rows = {7: 5, 3: 2, 11: 8, 0: 1, 4: 3, 9: 6, 2: 4, 5: 5, 8: 2, 1: 7}
    user = _samples(rng, rows).user
    user = np.concatenate([user[10:], user[:10]])  # storage order need not be by device
    donors = controls.donor_rows(user, seed=3)
    assert donors.shape == user.shape and donors.min() >= 0 and donors.max() < len(user)
    assert np.all(user[donors] != user)  # never the row's own device
    pi = {}
    for u in np.unique(user):
        taken = np.unique(user[donors[user == u]])
        assert len(taken) == 1  # every row of u takes the same donor device
        pi[int(u)] = int(taken[0])
    assert sorted(pi.values()) == sorted(pi)  # a permutation of the devices
    # the k-th row of u (storage order) takes the (k mod n_v)-th row of v = pi(u)
    for u, v in pi.items():
        own, theirs = np.flatnonzero(user == u), np.flatnonzero(user == v)
        np.testing.assert_array_equal(donors[own], theirs[np.arange(len(own)) % len(theirs)])
    np.testing.assert_array_equal(donors, controls.donor_rows(user, seed=3))
    assert not np.array_equal(donors, controls.donor_rows(user, seed=4))


def test_a_two_device_split_swaps_and_one_device_is_refused():
    np.testing.assert_array_equal(controls.donor_rows(np.array([4, 4, 6]), 0), [2, 2, 0])
    with pytest.raises(ValueError, match="at least 2 devices"):
        controls.donor_rows(np.array([5, 5, 5]), seed=0)


def test_shuffled_logits_score_each_row_with_its_donors_trigger(rng):
    model = get_model("sasrec", TINY)
    duet = Duet.create(model)
    params = duet.init(jax.random.key(1))
    samples = _samples(rng, {0: 5, 1: 3, 2: 6, 3: 2})
    got = score_at_test_time("duet_shuffled", duet, params, samples, reference=None, seed=2,
                             batch_size=16)
    donors = controls.donor_rows(samples.user, 2)
    swapped = dataclasses.replace(samples, trigger_seq=samples.trigger_seq[donors])
    # bitwise: the same jitted duet.apply on the same padded batches
    np.testing.assert_array_equal(got, predict(jax.jit(duet.apply), params, swapped, 16))
    own = predict(jax.jit(duet.apply), params, samples, 16)
    assert not np.array_equal(got, own)


# ---------------------------------------------------------------------------------------------
# duet_mean


@pytest.mark.parametrize(
    "name, options",
    [("sasrec", {}), ("gru4rec", {"low_rank": 2}), ("din", {"stabiliser": 2})],
)
def test_duet_mean_scores_every_row_with_one_head(name, options, rng):
    model = get_model(name, TINY)
    duet = Duet.create(model, **options)
    params = duet.init(jax.random.key(2))
    reference = _samples(rng, {0: 6, 1: 3, 2: 5})
    # device 0's second position keeps its first one's trigger (as between syncs when
    # sync_every > 1): a run of 2 * PER rows, so runs differ in length and must be weighted
    reference.trigger_seq[PER : 2 * PER] = reference.trigger_seq[0]
    samples = _samples(rng, {3: 4, 4: 5})
    batch_size = 8  # several batches, the last one padded

    # z-bar is the mean of z over the reference's rows, each row once
    row_z = jax.jit(controls.row_z, static_argnums=0)
    z = np.asarray(row_z(duet, params, reference.trigger_seq), np.float64)
    got = controls.mean_z(duet, params, reference, batch_size)
    # each z is the generator's encoder path in float32, in another batch shape here; the
    # mean adds a float32 sum of at most batch_size weighted terms (weights <= PER) per batch
    encoder = tol.generator_roundings(TINY.seq_len, TINY.embed_dim, TINY.embed_dim,
                                      TINY.embed_dim, embed=(1, TINY.embed_dim))
    bound = (tol.f32_pair_atol(encoder, tol.MODEL_SCALE)
             + tol.f32_atol(batch_size + 1, PER * np.abs(z).max()))
    tol.assert_within(got, z.mean(0), bound, "mean z")

    # one head: the template's structure with no per-row axis
    head = controls.mean_z_head(duet, params, reference, batch_size)
    for leaf in jax.tree.leaves(head):
        assert leaf.ndim <= 2  # kernels [in, out] (or a [k, k] core, [in, k], [k, out])
    logits = controls.mean_z_logits(duet, params, samples, reference, batch_size)
    assert logits.shape == (len(samples),)
    # the rows' own triggers are never read: bitwise the same logits without them
    blank = dataclasses.replace(samples, trigger_seq=np.zeros_like(samples.trigger_seq))
    np.testing.assert_array_equal(
        logits, controls.mean_z_logits(duet, params, blank, reference, batch_size))
    via_registry = score_at_test_time("duet_mean", duet, params, samples, reference=reference,
                                      seed=0, batch_size=batch_size)
    np.testing.assert_array_equal(logits, via_registry)


def test_docstring_examples_run():
    result = doctest.testmod(controls, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
