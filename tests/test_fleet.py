import dataclasses
import re

import jax
import ml_collections
import numpy as np
import pytest

from duet_jax import delivery
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError, DataError
from duet_jax.fleet import (
    FleetConfig,
    Simulator,
    build_streams,
    direct_logits,
    embedding_distance,
    recent_mean_embedding,
    start_of_round_samples,
    totals,
)
from duet_jax.models import get_model
from duet_jax.training import predict
from experiments import config as config_lib
from experiments import experiment
from tests import tolerances as tol
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def world():
    """Tiny synthetic data and a randomly initialised DUET + Base (equalities need no training)."""
    config = tiny_config()
    data = experiment.load_data(config)
    model = get_model("sasrec", config_lib.model_config(config, data.num_items))
    duet = Duet.create(model)
    return {
        "config": model.config,
        "data": data,
        "model": model,
        "duet": duet,
        "params": duet.init(jax.random.key(3)),
        "base": model.init(jax.random.key(4)),
    }


def _config(**kw) -> FleetConfig:
    return FleetConfig(progress=False, min_bucket=8, score_batch_size=128, **kw)


def _simulate(world, streams, **kw):
    sim = Simulator(streams, world["duet"], world["params"], _config(**kw))
    return sim, {p: sim.run_policy(p) for p in sim.config.policies}


def _model_roundings(world) -> int:
    """The tiny SASRec's longest input-to-logit path (D = 8, L = 10, 2 heads, ffn 4D)."""
    c = world["config"]
    return tol.model_roundings("sasrec", c.embed_dim, c.seq_len, c.num_heads, c.ffn_mult)


def _generator_roundings(world) -> int:
    """Generation from a trigger: SASRec's sequence embedding (E[seq] + P, then the input
    projection over D), a GRU step per position over D features, hidden = z = D."""
    c = world["config"]
    d = c.embed_dim
    return tol.generator_roundings(c.seq_len, d, d, d, embed=(1, d))


def _heads_atol(world) -> float:
    """|a head value generated in one float32 evaluation - another| (the cloud's padded
    buckets vs one jitted ``Duet.generate`` call)."""
    return float(tol.f32_pair_atol(_generator_roundings(world), tol.MODEL_SCALE))


def _duet_logits_atol(world) -> float:
    """|fleet DUET logit - direct ``Duet.apply`` logit|: two float32 evaluations of other
    shapes and fusions (the fleet generates in cloud buckets and scores a per-device head on
    backbone features computed once; the direct path runs ``Duet.apply`` in batches of 64).
    A rounding error reaches the logit through the generator and then the head, or through
    the backbone and then the head: the sum of both paths' roundings covers either (it counts
    the head twice, which only loosens the bound)."""
    n = _generator_roundings(world) + _model_roundings(world)
    return float(tol.f32_pair_atol(n, tol.MODEL_SCALE))


def _delivery_atol(world, sim, run, err) -> np.ndarray:
    """Per sample, a bound on |logit with the delivered head - logit with the float32 head|.

    The head is ``u = W2 h + b2`` with ``h = tanh(W1 s + b1)``, the logit ``<u, t>``. A
    delivered head ``W + dW`` with ``|dW| <= E`` elementwise gives, in exact arithmetic
    (tanh is 1-Lipschitz and bounded by 1), ``|dh_i| <= p_i = sum_k E1_ki |s_k| + Eb1_i``
    and ``|d logit| <= sum_j |t_j| (sum_i (|W2_ij| p_i + E2_ij min(1, |h_i| + p_i)) + Eb2_j)``.
    ``err`` maps ``|W|`` to ``E``. The fleet does not keep its float32 heads, so they are
    regenerated here with ``Duet.generate``, within ``g`` = :func:`_heads_atol` of the
    fleet's (other bucket shapes): ``|W| + g`` stands for ``|W|``, and
    ``|h| + g (sum_k |s_k| + 1)`` for ``|h|``. Both logits are float32 evaluations of one
    jitted head on different values: add a pair bound over the head's path (fan-ins D, D, D).
    -> ``[S]``.
    """
    c = world["config"]
    seqs = sim.streams.seq[run.trigger_event]
    heads = jax.tree.map(lambda x: np.asarray(x, np.float64),
                         jax.jit(world["duet"].generate)(world["params"], seqs))
    g = _heads_atol(world)
    w = jax.tree.map(lambda x: np.abs(x) + g, heads)
    e = err(w)
    s = np.asarray(sim.features["user"], np.float64)
    t = np.abs(np.asarray(sim.features["target"], np.float64))
    pre = np.einsum("bk,bki->bi", s, heads["dense1"]["kernel"]) + heads["dense1"]["bias"]
    s = np.abs(s)
    p = np.einsum("bk,bki->bi", s, e["dense1"]["kernel"]) + e["dense1"]["bias"]
    h = np.minimum(np.abs(np.tanh(pre)) + g * (s.sum(axis=1, keepdims=True) + 1) + p, 1.0)
    d_u = (np.einsum("bi,bij->bj", p, w["dense2"]["kernel"])
           + np.einsum("bi,bij->bj", h, e["dense2"]["kernel"]) + e["dense2"]["bias"])
    rounding = tol.f32_pair_atol(tol.path_roundings(*(c.embed_dim,) * 3), tol.MODEL_SCALE)
    return np.sum(t * d_u, axis=-1) + rounding


def _bf16_error(heads):
    """Round to nearest bfloat16 (8 significant bits): ``|dw| <= 2**-8 |w|`` per value."""
    return jax.tree.map(lambda w: tol.BF16_ULP / 2 * w, heads)


def _int8_error(heads):
    """Per leaf and device, ``|dw| <= scale / 2 = max|w| / 254`` (``delivery.int8_tolerance``),
    plus float32 rounding of ``scale``, ``w / scale`` and ``q * scale`` (4 roundings of
    values up to ``max|w|``, as tests/test_delivery.py counts them)."""
    def leaf(w):
        top = w.reshape(len(w), -1).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
        step = top / (2 * delivery.INT8_MAX) + tol.f32_atol(4, top)
        return np.broadcast_to(step, w.shape)

    return jax.tree.map(leaf, heads)


def _auc_atol(ref: np.ndarray, got: np.ndarray, labels: np.ndarray) -> float:
    """A bound on |AUC(got) - AUC(ref)|: a (positive, negative) pair can change its order (or
    tie) only if its margin ``|ref_p - ref_n| <= |d_p| + |d_n|`` (``d = got - ref``, exact in
    float64 for float32 logits), and then moves AUC by at most ``1 / (P N)``; each AUC is an
    exact rank sum divided once in float64 (one rounding each)."""
    pos, neg = labels == 1, labels == 0
    ref, d = np.asarray(ref, np.float64), np.abs(np.asarray(got, np.float64) - ref)
    margin = np.abs(ref[pos][:, None] - ref[neg][None, :])
    close = margin <= d[pos][:, None] + d[neg][None, :]
    return float(close.sum() / close.size + tol.f64_atol(1, 1.0))


def test_streams_keep_each_device_in_order_and_cut_it_into_rounds(world):
    test = world["data"].test
    streams = build_streams(test, num_rounds=3)
    assert len(streams.samples) == len(test)
    assert streams.num_devices == len(np.unique(test.user))
    per = 1 + 4  # a positive and its eval_negatives share one event
    assert len(streams.seq) == len(test) // per
    np.testing.assert_array_equal(np.bincount(streams.sample_event), per)
    np.testing.assert_array_equal(streams.samples.click_seq, streams.seq[streams.sample_event])
    for slot in range(streams.num_devices):
        events = np.flatnonzero(streams.slot == slot)
        n = len(events)
        np.testing.assert_array_equal(streams.index[events], np.arange(n))
        rounds = streams.round[events]
        assert rounds[0] == 0 and np.all(np.diff(rounds) >= 0) and rounds[-1] < 3
        if n >= 3:  # nearly equal chunks
            counts = np.bincount(rounds, minlength=3)
            assert counts.max() - counts.min() <= 1


def test_a_subset_of_devices_is_seeded(world):
    test = world["data"].test
    a = build_streams(test, 2, num_devices=10, seed=1)
    b = build_streams(test, 2, num_devices=10, seed=1)
    c = build_streams(test, 2, num_devices=10, seed=2)
    assert a.num_devices == 10 and set(a.samples.user) == set(a.devices)
    np.testing.assert_array_equal(a.devices, b.devices)
    assert not np.array_equal(a.devices, c.devices)
    with pytest.raises(ConfigError, match=r"config\.fleet\.num_devices"):
        build_streams(test, 2, num_devices=10_000)


def test_interleaved_devices_are_refused(world):
    test = world["data"].test
    order = np.argsort(np.arange(len(test)) % 2, kind="stable")
    shuffled = dataclasses.replace(test, **test.take(order))
    with pytest.raises(DataError, match="grouped by device"):
        build_streams(shuffled, 2)


def test_every_round_float32_equals_direct_duet_evaluation(world):
    """The acceptance equality: fleet scores == Duet.apply with trigger = start-of-round seq."""
    streams = build_streams(world["data"].test, num_rounds=2)
    _, runs = _simulate(world, streams, policies=("every_round",), formats=("float32",))
    run = runs["every_round"]
    expected = direct_logits(world["duet"], world["params"], start_of_round_samples(streams), 64)
    atol = _duet_logits_atol(world)
    tol.assert_within(run.logits["float32"], expected, atol, "fleet vs direct")
    # not a trivial equality: start-of-round triggers score differently from per-sample ones,
    # by more than two float32 evaluations of the same logits can differ
    own = direct_logits(world["duet"], world["params"], streams.samples, 64)
    assert np.abs(own - expected).max() > atol
    # staleness counts items since the round's start, so each round's first event is fresh
    first = streams.index[streams.sample_event] == streams.index[run.trigger_event]
    assert np.all(run.staleness[first] == 0) and run.staleness.max() >= 1


def test_one_event_per_round_reproduces_the_main_job_evaluation(world):
    """With T >= every stream's length and sync_every = 1, each round is one interaction and
    the fleet equals the main job's DUET test evaluation (trigger_seq == click_seq)."""
    test = world["data"].test
    streams = build_streams(test, num_rounds=50)
    _, runs = _simulate(world, streams, policies=("every_round",), formats=("float32",))
    run = runs["every_round"]
    np.testing.assert_array_equal(test.trigger_seq, test.click_seq)
    expected = predict(jax.jit(world["duet"].apply), world["params"], test, 64)
    tol.assert_within(run.logits["float32"], expected, _duet_logits_atol(world),
                      "fleet vs main-job evaluation")
    assert np.all(run.staleness == 0)


def test_no_trigger_holds_the_items_being_scored(world):
    streams = build_streams(world["data"].test, num_rounds=3)
    _, runs = _simulate(world, streams, formats=("float32",))
    event = streams.sample_event
    for run in runs.values():
        trig = run.trigger_event
        assert np.all(streams.slot[trig] == streams.slot[event])  # own device's sequence
        assert np.all(streams.index[trig] <= streams.index[event])  # from before the sample
        assert np.all(streams.round[trig] <= streams.round[event])
        # the trigger is the sequence before its event, so no scored target is in it
        # (the data never repeat an item within a user)
        targets = streams.samples.target[streams.samples.label == 1]
        trig_pos = trig[streams.samples.label == 1]
        assert not np.any(streams.seq[trig_pos] == targets[:, None])


def test_never_keeps_the_first_sync_head(world):
    streams = build_streams(world["data"].test, num_rounds=3)
    _, runs = _simulate(world, streams, policies=("never",), formats=("float32",))
    run = runs["never"]
    np.testing.assert_array_equal(run.requests, 1)
    first = streams.first_event(0)
    samples = streams.samples.arrays()
    samples["trigger_seq"] = streams.seq[first[streams.sample_slot]]
    expected = direct_logits(world["duet"], world["params"],
                             dataclasses.replace(streams.samples, **samples), 64)
    tol.assert_within(run.logits["float32"], expected, _duet_logits_atol(world),
                      "never vs direct with the first trigger")


def test_policies_bracket_each_other(world):
    """every_k_items with k = 1 and drift_threshold with threshold 0 are every_round;
    a k or threshold no device reaches is never."""
    streams = build_streams(world["data"].test, num_rounds=4)
    kw = {"formats": ("float32",)}
    _, eager = _simulate(world, streams, policies=("every_round", "never"), **kw)
    _, k1 = _simulate(world, streams, policies=("every_k_items",), every_k=1, **kw)
    _, k_big = _simulate(world, streams, policies=("every_k_items",), every_k=1000, **kw)
    _, d0 = _simulate(world, streams, policies=("drift_threshold",), threshold=0.0, **kw)
    _, d_big = _simulate(world, streams, policies=("drift_threshold",), threshold=1e9,
                         distance="l2", **kw)
    same = [(k1["every_k_items"], "every_round"), (k_big["every_k_items"], "never"),
            (d0["drift_threshold"], "every_round"), (d_big["drift_threshold"], "never")]
    for run, other in same:
        np.testing.assert_array_equal(run.requests, eager[other].requests)
        # the same requests in the same order, so the same jitted generation and scoring on
        # the same inputs and shapes: bitwise equal, no tolerance
        np.testing.assert_array_equal(run.logits["float32"], eager[other].logits["float32"])
    assert eager["every_round"].requests.sum() > eager["never"].requests.sum()


def test_every_k_items_requests_only_after_k_new_items(world):
    streams = build_streams(world["data"].test, num_rounds=4)
    _, runs = _simulate(world, streams, policies=("every_k_items",), every_k=2,
                        formats=("float32",))
    run = runs["every_k_items"]
    for slot in range(streams.num_devices):
        triggers = np.unique(run.trigger_event[streams.sample_slot == slot])
        assert streams.index[triggers[0]] == 0  # first sync at the period start
        assert np.all(np.diff(streams.index[triggers]) >= 2)


def test_records_count_bytes_per_format(world):
    streams = build_streams(world["data"].test, num_rounds=3)
    _, runs = _simulate(world, streams, policies=("every_round",))
    spec = world["duet"].spec
    run = runs["every_round"]
    by_fmt = {}
    for rec in run.records:
        assert rec["bytes_down"] == rec["requests"] * delivery.payload_bytes(spec, rec["format"])
        by_fmt.setdefault(rec["format"], []).append(rec)
    assert set(by_fmt) == set(delivery.FORMATS)
    # ids upload: 4 bytes per non-padding id of each request's trigger
    requested = np.unique(run.trigger_event)
    up = sum(r["bytes_up"] for r in by_fmt["float32"])
    assert up == 4 * int((streams.seq[requested] > 0).sum())
    assert sum(r["requests"] for r in by_fmt["int8"]) == len(requested) == run.requests.sum()
    t = totals(run, streams, "int8")
    assert t["bytes_down"] == run.requests.sum() * (spec.num_values + 4 * len(spec.sizes))


def test_lossy_formats_barely_move_the_scores(world):
    streams = build_streams(world["data"].test, num_rounds=3)
    sim, runs = _simulate(world, streams, policies=("every_round",))
    run = runs["every_round"]
    ref = run.logits["float32"]
    aucs = {f: totals(run, streams, f)["auc"] for f in run.logits}
    for fmt, err in (("bfloat16", _bf16_error), ("int8", _int8_error)):
        got = run.logits[fmt]
        bound = _delivery_atol(world, sim, run, err)
        assert np.abs(got - ref).max() > 0  # it really is lossy
        tol.assert_within(got, ref, bound, f"{fmt} vs float32 logits")
        auc_atol = _auc_atol(ref, got, streams.samples.label)
        assert abs(aucs[fmt] - aucs["float32"]) <= auc_atol, (fmt, aucs, auc_atol)


def test_base_is_the_static_head_and_sends_nothing(world):
    streams = build_streams(world["data"].test, num_rounds=3)
    sim = Simulator(streams, world["duet"], world["params"], _config(formats=("float32",)))
    run = sim.base_run(world["model"], world["base"])
    model = world["model"]
    expected = predict(jax.jit(lambda p, b: model.apply(p["backbone"], p["head"], b)),
                       world["base"], streams.samples, 64)
    # the same function in batches of 128 (the fleet) and 64: two float32 evaluations
    atol = tol.f32_pair_atol(_model_roundings(world), tol.MODEL_SCALE)
    tol.assert_within(run.logits["static"], expected, atol, "base run vs predict")
    assert all(r["bytes_down"] == r["bytes_up"] == r["requests"] == 0 for r in run.records)


def test_recent_mean_embedding_and_distances():
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    seqs = np.array([[1, 2, 3, 0], [0, 0, 0, 0], [5, 0, 0, 0]])
    mean = recent_mean_embedding(table, seqs, window=2)
    # small integers: every sum and the halving are exact in floating point
    np.testing.assert_array_equal(mean, [(table[2] + table[3]) / 2, [0, 0], table[5]])
    a, b = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 1.0]])
    # exact: a zero dot product (1 - 0), and 0 for a zero vector by convention
    np.testing.assert_array_equal(embedding_distance(a, b, "cosine"), [1.0, 0.0])
    # exact squares summed, then one float64 square root: one rounding each side
    want = np.sqrt([5.0, 2.0])
    tol.assert_within(embedding_distance(a, b, "l2"), want, tol.f64_atol(1, want), "l2")


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_rounds", 0), ("policies", "every_round,sometimes"), ("formats", "float16"),
     ("threshold", -1.0), ("upload", "embedding"), ("distance", "manhattan"),
     ("every_k", 0), ("max_bucket", 2), ("vector_width", 384), ("vector_width", True)],
)
def test_bad_fleet_config_names_the_field(field, value):
    fleet = ml_collections.ConfigDict({"min_bucket": 8, field: value})
    with pytest.raises(ConfigError, match=re.escape(f"config.fleet.{field}=")):
        FleetConfig.from_config(fleet)


def test_the_cloud_compiles_with_the_fleet_configs_vector_width(world):
    streams = build_streams(world["data"].test, 2, 4, 0)
    for width in (0, 512):
        sim = Simulator(streams, world["duet"], world["params"],
                        _config(formats=("float32",), vector_width=width))
        assert sim.cloud.vector_width == width


def test_fleet_config_reads_comma_lists_and_rejects_unknown_fields():
    fc = FleetConfig.from_config(ml_collections.ConfigDict(
        {"policies": "never, every_round", "formats": "int8"}))
    assert fc.policies == ("never", "every_round") and fc.formats == ("int8",)
    with pytest.raises(ConfigError, match=r"config\.fleet\.rounds"):
        FleetConfig.from_config(ml_collections.ConfigDict({"rounds": 3}))


def test_the_fleet_config_file_holds_fleet_config_defaults():
    """experiments/configs/fleet.py writes no default of its own: it reads FleetConfig's."""
    from experiments.configs import fleet as fleet_config

    fields = fleet_config.get_config().fleet
    assert FleetConfig.from_config(fields) == FleetConfig()
    assert fields.policies == ",".join(FleetConfig().policies)  # a string, as users type it


def test_a_repeated_full_window_still_gives_one_event_per_positive():
    """Without dedupe a user can repeat an item until two positions share a full window."""
    from duet_jax.data.samples import SampleConfig, build_samples

    seq = np.array([1, 2, 2, 2, 2, 3])  # windows of 2 before positions 4 and 5 are both [2, 2]
    splits = build_samples([seq], np.array([1]), np.array([3]), 9,
                           SampleConfig(seq_len=2, eval_negatives=2), seed=0)
    streams = build_streams(splits.test, num_rounds=3)
    assert len(streams.seq) == 3  # positions 3, 4, 5
    np.testing.assert_array_equal(streams.index, [0, 1, 2])
    np.testing.assert_array_equal(np.bincount(streams.sample_event), 3)


def test_streamed_heads_score_as_kept_heads(world):
    """keep_heads=False (no [devices, values] table; heads regenerated when scored) gives the
    kept-table simulation's requests and traffic exactly and its scores up to float32
    rounding, for every policy."""
    streams = build_streams(world["data"].test, num_rounds=3)
    kw = dict(formats=("float32",), max_bucket=16)
    kept = Simulator(streams, world["duet"], world["params"],
                     dataclasses.replace(_config(**kw), keep_heads=True))
    streamed = Simulator(streams, world["duet"], world["params"],
                         dataclasses.replace(_config(**kw), keep_heads=False))
    # max_bucket 16 < devices: the streamed scoring runs in several chunks of triggers
    assert streams.num_devices > 16
    # both regenerate from the same trigger sequence in other buckets: the generation
    # pair bound plus the model's, as the direct comparison above
    atol = _duet_logits_atol(world)
    for policy in FleetConfig().policies:
        a, b = kept.run_policy(policy), streamed.run_policy(policy)
        for key in ("requests", "bytes_up", "bytes_down", "samples", "online_devices"):
            assert [r[key] for r in a.records] == [r[key] for r in b.records], (policy, key)
        np.testing.assert_array_equal(a.trigger_event, b.trigger_event)
        np.testing.assert_array_equal(a.requests, b.requests)
        tol.assert_within(b.logits["float32"], a.logits["float32"], atol, policy)
    assert FleetConfig().keep_heads  # the original simulation stays the default
