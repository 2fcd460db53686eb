"""``Duet.prepare`` / ``generate_prepared``: the per-item work done once per parameter set
gives the same heads as ``Duet.generate``, for every built-in model and GRU-family encoder,
with padding, empty sequences, low-rank and stabilised heads."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import duet as duet_lib
from duet_jax import encoders
from duet_jax.duet import Duet
from duet_jax.lowrank import LowRankKernel
from duet_jax.models import DeviceModel, ModelConfig, get_model, layers, sasrec
from tests import tolerances as tol

D, L, ITEMS = 8, 7, 40
CONFIG = ModelConfig(num_items=ITEMS, seq_len=L, embed_dim=D, din_hidden=(8,))


def _duet(model: str, **options) -> tuple[Duet, dict]:
    duet = Duet.create(get_model(model, CONFIG), **options)
    params = duet.init(jax.random.key(3))
    # off the init's symmetric values (zero biases), so a wrong bias fold or row would show
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype), params)
    return duet, params


def _sequences(n: int = 70) -> np.ndarray:
    """``[n, L]`` right-padded ids: lengths 0..L (row 0 empty, row 1 full)."""
    rng = np.random.default_rng(5)
    seq = rng.integers(1, ITEMS + 1, (n, L)).astype(np.int32)
    lengths = rng.integers(0, L + 1, n)
    lengths[0], lengths[1] = 0, L
    seq[np.arange(L) >= lengths[:, None]] = 0
    return seq


def test_each_built_in_model_prepares_what_it_can():
    def prepared_keys(model, **options):  # shapes only (eval_shape): nothing is computed
        duet = Duet.create(get_model(model, CONFIG), **options)
        params = jax.eval_shape(duet.init, jax.random.key(0))
        return sorted(jax.eval_shape(duet.prepare, params))

    for model, kind in (("gru4rec", "projected"), ("din", "projected"), ("sasrec", "features")):
        assert prepared_keys(model) == sorted({"params", kind})
    # an encoder without a per-row first step keeps the model's features only
    assert prepared_keys("gru4rec", encoder="attention") == ["features", "params"]
    assert encoders.token_projection("attention") is None


@pytest.mark.parametrize("model", ["gru4rec", "din"])
def test_token_features_are_embed_sequence_per_item(model):
    duet, params = _duet(model)
    seq = _sequences()
    want, want_mask = duet.model.embed_sequence(params["backbone"], jnp.asarray(seq))
    tokens = duet.model.prepare_features(params["backbone"])["tokens"]
    assert tokens.shape == (ITEMS + 1, D)
    got, got_mask = duet.model.embed_prepared({"tokens": tokens}, jnp.asarray(seq))
    np.testing.assert_array_equal(got_mask, want_mask)
    # the same per-row computation (a dot of D terms, a bias, a tanh) on the same row, but
    # on another batch shape: XLA's CPU matmul may block the dot differently for it (seen on
    # an AVX2 CPU, 9e-8; bitwise equal on an AVX-512 one), so two float32 summation orders
    tol.assert_within(got, want, tol.f32_pair_atol(D + tol.ELEMENTWISE, tol.MODEL_SCALE),
                      "per-item features")


def test_sasrec_split_projection_equals_embed_sequence():
    duet, params = _duet("sasrec")
    seq = jnp.asarray(_sequences())
    want, want_mask = duet.model.embed_sequence(params["backbone"], seq)
    tables = duet.model.prepare_features(params["backbone"])
    got, got_mask = duet.model.embed_prepared(tables, seq)
    np.testing.assert_array_equal(got_mask, want_mask)
    # (E + P) W + b against E W + (P W + b): a dot of D terms plus 2 adds, summed in
    # another order on both sides, before a 1-Lipschitz tanh
    tol.assert_within(got, want, tol.f32_pair_atol(D + 2 + tol.ELEMENTWISE, tol.MODEL_SCALE))
    # the time-major gather: the same values, laid out [L, B, D] (same operations: exact)
    tm, tm_mask = duet.model.embed_prepared_time_major(tables, seq)
    np.testing.assert_array_equal(tm, np.swapaxes(got, 0, 1))
    np.testing.assert_array_equal(tm_mask, got_mask.T)
    # a batch cut after position 3 (generation's trailing-padding cut): its first 3
    # positions, by the same operations; longer than seq_len is refused
    assert duet.model.cuts_trailing_padding
    cut, cut_mask = duet.model.embed_prepared(tables, seq[:, :3])
    np.testing.assert_array_equal(cut, got[:, :3])
    np.testing.assert_array_equal(cut_mask, got_mask[:, :3])
    cut_tm, _ = duet.model.embed_prepared_time_major(tables, seq[:, :3])
    np.testing.assert_array_equal(cut_tm, tm[:3])
    longer = jnp.concatenate([seq, seq[:, :1]], axis=1)
    for embed in (duet.model.embed_prepared, duet.model.embed_prepared_time_major):
        with pytest.raises(ValueError, match="seq_len"):
            embed(tables, longer)


@pytest.mark.parametrize("options", [{}, {"low_rank": 2}, {"stabiliser": 3}, "stacked",
                                     "chunked"])
@pytest.mark.parametrize("model", ["gru4rec", "din", "sasrec"])
def test_prepared_generation_equals_generate(model, options, monkeypatch):
    n = 70  # devices: above the decoders' bias-fold threshold
    if options == "stacked":  # large vocabularies: one stacked table of [3, H] rows
        monkeypatch.setattr(duet_lib, "SEPARATE_TABLES_MAX_BYTES", 0)
        options = {}
    if options == "chunked":  # large calls: the encoder runs 16 devices at a time
        monkeypatch.setattr(duet_lib, "ENCODE_CHUNK", 16)
        options, n = {}, 80
    duet, params = _duet(model, **options)
    seq = jnp.asarray(_sequences(n))
    want = jax.jit(duet.generate)(params, seq)
    prepared = duet.prepare(params)
    if "projected" in prepared:
        stacked = duet_lib.SEPARATE_TABLES_MAX_BYTES == 0
        tables = prepared["projected"]
        assert (tables.shape == (ITEMS + 1, 3, D)) if stacked else (
            [t.shape for t in tables] == [(ITEMS + 1, D)] * 3)
    got = jax.jit(duet.generate_prepared)(prepared, seq)
    # The same operations per device, partly in another order (the SASRec split, batched vs
    # vmapped matmuls): the generator's rounding path (embedding, one GRU step per position,
    # two dense layers, a decoder) bounds the difference between two float32 evaluations.
    roundings = tol.generator_roundings(L, D, D, D, embed=(D + 2,),
                                        stabiliser=(3, 64) if "stabiliser" in options else (0, 0))
    atol = tol.f32_pair_atol(roundings, tol.MODEL_SCALE)
    is_leaf = lambda x: isinstance(x, LowRankKernel)
    leaves_want, leaves_got = jax.tree.leaves(want, is_leaf), jax.tree.leaves(got, is_leaf)
    assert jax.tree.structure(want, is_leaf) == jax.tree.structure(got, is_leaf)
    for a, b in zip(leaves_got, leaves_want, strict=True):
        if isinstance(a, LowRankKernel):
            np.testing.assert_array_equal(a.u, b.u)
            a, b = a.core, b.core
        assert a.shape == b.shape and a.dtype == b.dtype
        tol.assert_within(a, b, atol, model)


def test_bfloat16_encoder_prepared_equals_its_plain_path():
    duet, params = _duet("gru4rec", encoder="gru_bf16")
    seq = jnp.asarray(_sequences())
    features, mask = duet.model.embed_sequence(params["backbone"], seq)
    gen = duet.generator
    want = jax.vmap(lambda f, m: gen.apply(params["generator"], f, m, method=gen.encode))(
        features, mask)
    projection = encoders.token_projection("gru_bf16")
    prepared = duet.prepare(params)
    assert all(t.dtype == jnp.bfloat16 for t in prepared["projected"])
    enc = params["generator"]["params"]["encoder"]
    got = projection.encode(enc, tuple(t[seq.T] for t in prepared["projected"]), seq.T != 0)
    # Both round the same float32 rows and weights to bfloat16 (8 significant bits, unit
    # roundoff 2^-8) and multiply them; only accumulation orders may differ, by a few 2^-8
    # per step on gates <= 1, compounding over 7 steps to ~0.05 on the state, carried to z
    # by float32 dense layers of width 8 and weights <= 0.7 at about that size: 0.1 bounds
    # it (the bound test_fast_encoders derives). A wrong table row or gate is O(1) off.
    tol.assert_within(got, want, 0.1, "z")
    heads = jax.jit(duet.generate_prepared)(prepared, seq)
    assert heads["dense1"]["kernel"].dtype == jnp.float32  # heads stay float32


def test_gru_split_equals_gru():
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32),
                          layers.gru_init(jax.random.key(0), D, D))
    x = rng.normal(size=(5, L, D)).astype(np.float32)
    mask = np.arange(L) < np.array([0, 1, 3, 6, 7])[:, None]
    want = layers.gru(params, jnp.asarray(x), jnp.asarray(mask))
    gates = layers.gru_input_gates(params, jnp.moveaxis(jnp.asarray(x), 1, 0))
    got = layers.gru_recurrence(params, gates, jnp.asarray(mask.T))
    np.testing.assert_array_equal(got, want)  # the very same operations
    np.testing.assert_array_equal(got[0], np.zeros(D))  # empty: the initial state


def test_a_model_without_a_time_major_gather_falls_back_to_a_transpose():
    duet, params = _duet("sasrec")
    # the SASRec functions minus embed_prepared_time_major, as a registered model might be
    impl = types.SimpleNamespace(**{name: getattr(sasrec, name) for name in (
        "init", "embed_sequence", "encode", "head_logits", "apply", "prepare_features",
        "embed_prepared")})
    model = DeviceModel("sasrec_plain", CONFIG, impl)
    tables = model.prepare_features(params["backbone"])
    seq = jnp.asarray(_sequences())
    got, got_mask = model.embed_prepared_time_major(tables, seq)
    want, want_mask = duet.model.embed_prepared_time_major(tables, seq)
    np.testing.assert_array_equal(got, want)  # the same values either way
    np.testing.assert_array_equal(got_mask, want_mask)
    plain = Duet(model, duet.generator)
    heads = jax.jit(plain.generate_prepared)(plain.prepare(params), seq)
    ref = jax.jit(duet.generate_prepared)(duet.prepare(params), seq)
    # the same arrays enter the same projection and recurrence; only a different fusion of
    # the gather could reorder a sum: the generator's float32 rounding path bounds that
    atol = tol.f32_pair_atol(tol.generator_roundings(L, D, D, D, embed=(D + 2,)),
                             tol.MODEL_SCALE)
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(ref), strict=True):
        tol.assert_within(a, b, atol, "transposed fallback")


def test_steps_needed_and_the_lengths_a_batch_is_cut_to():
    seq = jnp.asarray([[0, 0, 0, 0], [5, 0, 0, 0], [5, 6, 7, 8], [5, 0, 7, 0]])
    # 1 + the last valid position (an interior 0 does not end a sequence)
    np.testing.assert_array_equal(duet_lib.steps_needed(seq), [0, 1, 4, 3])
    assert duet_lib.STEP_BUCKET == 8
    assert duet_lib.step_buckets(30) == (8, 16, 24, 30)
    assert duet_lib.step_buckets(16) == (8, 16)
    assert duet_lib.step_buckets(7) == (7,)


def test_in_length_order_groups_similar_lengths_and_restores_the_order(monkeypatch):
    monkeypatch.setattr(duet_lib, "ENCODE_CHUNK", 4)
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 9, 16)
    seq = np.where(np.arange(8) < lengths[:, None], 7, 0).astype(np.int32)
    rows = np.arange(16, dtype=np.int32)

    def fn(s, r):  # each row: its own id, and the longest trigger of the chunk it ran in
        return r, jnp.broadcast_to(jnp.max(duet_lib.steps_needed(s)), r.shape)

    back, chunk_longest = duet_lib.in_length_order(fn, jnp.asarray(seq), jnp.asarray(rows))
    np.testing.assert_array_equal(back, rows)  # every row back in its place
    # chunks of 4 consecutive rows in stable length order: each row's chunk ends at the
    # 4th-shortest, 8th-shortest, ... trigger
    order = np.argsort(lengths, kind="stable")
    want = np.empty(16, np.int64)
    want[order] = np.repeat(lengths[order].reshape(4, 4).max(axis=1), 4)
    np.testing.assert_array_equal(chunk_longest, want)
    # what the ordering is for: fewer steps in all than chunks of the input order
    assert want.sum() < np.repeat(lengths.reshape(4, 4).max(axis=1), 4).sum()


LONG = ModelConfig(num_items=ITEMS, seq_len=20, embed_dim=D, din_hidden=(8,))


def _long_sequences(n: int, max_length: int) -> np.ndarray:
    """``[n, 20]`` right-padded ids with lengths 0..max_length (row 0 empty, row 1 the
    longest)."""
    rng = np.random.default_rng(6)
    seq = rng.integers(1, ITEMS + 1, (n, LONG.seq_len)).astype(np.int32)
    lengths = rng.integers(0, max_length + 1, n)
    lengths[0], lengths[1] = 0, max_length
    seq[np.arange(LONG.seq_len) >= lengths[:, None]] = 0
    return seq


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("model", ["gru4rec", "din", "sasrec"])
def test_generation_cut_by_length_equals_the_whole_padded_sequence(model, chunked,
                                                                  monkeypatch):
    n = 70
    if chunked:  # several chunks: devices are ordered by length first, then put back
        monkeypatch.setattr(duet_lib, "ENCODE_CHUNK", 16)
        n = 80
    duet = Duet.create(get_model(model, LONG))
    params = duet.init(jax.random.key(3))
    prepared = duet.prepare(params)
    seq = jnp.asarray(_long_sequences(n, 20))
    whole = jax.jit(lambda p, s: duet.generate_prepared(p, s, by_length=False))(prepared, seq)
    cut = jax.jit(duet.generate_prepared)(prepared, seq)
    # each device runs the same operations on its valid positions; padded positions only
    # hold the GRU state, so cutting them changes at most the order of float32 sums (other
    # batch shapes): two evaluations along the generator's rounding path
    atol = tol.f32_pair_atol(tol.generator_roundings(LONG.seq_len, D, D, D, embed=(D + 2,)),
                             tol.MODEL_SCALE)
    for a, b in zip(jax.tree.leaves(cut), jax.tree.leaves(whole), strict=True):
        tol.assert_within(a, b, atol, f"{model}: cut by length vs whole")
    # the devices are not mixed up: a device's head does not depend on its neighbours
    one = jax.jit(duet.generate_prepared)(prepared, seq[5:6])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(cut), strict=True):
        tol.assert_within(a[0], b[5], atol, f"{model}: device 5 alone")


def test_a_batch_of_short_sequences_is_encoded_cut_to_its_longest(monkeypatch):
    duet = Duet.create(get_model("sasrec", LONG))
    prepared = duet.prepare(duet.init(jax.random.key(3)))
    widths = []
    real = Duet._encode_prepared
    monkeypatch.setattr(Duet, "_encode_prepared",
                        lambda self, p, s: widths.append(s.shape[1]) or real(self, p, s))
    with jax.disable_jit():  # lax.switch then runs the chosen branch alone
        for longest, width in ((5, 8), (8, 8), (9, 16), (17, 20), (0, 8)):
            widths.clear()
            duet._encode_cut(prepared, jnp.asarray(_long_sequences(6, longest)))
            assert widths == [width], (longest, widths)
