"""The on-device fine-tuning baseline: Base at 0 steps, vmap == loop, padding-invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import finetune
from duet_jax.errors import ConfigError
from duet_jax.methods import base_method
from duet_jax.models import get_model
from duet_jax.training import evaluate, predict
from experiments import config as config_lib
from experiments import experiment
from tests import tolerances as tol
from tests.conftest import tiny_config

EVAL_BATCH = 256  # Base's evaluation batch in these tests (tiny_config's eval_batch_size)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    data = experiment.load_data(config)
    models = {
        name: get_model(name, config_lib.model_config(config, data.num_items))
        for name in ("sasrec", "gru4rec", "din")
    }
    params = {name: m.init(jax.random.key(1)) for name, m in models.items()}
    return data, models, params


def _config(**kw):
    defaults = dict(steps=(0, 3), learning_rates=(1e-2,), num_samples=12, group_size=8,
                    progress=False)
    return finetune.FinetuneConfig(**{**defaults, **kw})


def _test_stage(data, num_samples):
    return finetune.make_stage([data.train, data.val], data.test, data.num_users, num_samples)


def _tuned_atol(name: str, steps: int) -> float:
    """Two float32 runs of ``steps`` Adam steps then scoring, in different summation orders
    (another group size or padding): see :func:`tests.tolerances.finetuned_roundings`."""
    config = tiny_config()
    forward = tol.model_roundings(name, config.embed_dim, config.seq_len,
                                  config.sasrec.num_heads, din_hidden=tuple(config.din.hidden))
    return tol.f32_pair_atol(tol.finetuned_roundings(forward, steps), tol.MODEL_SCALE)


@pytest.mark.parametrize("name", ["sasrec", "din"])
@pytest.mark.parametrize("mode", finetune.PARAM_MODES)
def test_zero_steps_equals_base(setup, name, mode):
    data, models, params = setup
    model = models[name]
    result = finetune.finetune_and_evaluate(
        model, params[name], data, _config(steps=(0,), params=mode), eval_batch_size=EVAL_BATCH
    )
    # Base as the experiment evaluates it
    logits_fn = jax.jit(base_method(model).logits)
    base_test = evaluate(logits_fn, params[name], data.test, EVAL_BATCH)
    base_val = evaluate(logits_fn, params[name], data.val, EVAL_BATCH)
    # exact: 0 steps scores Base's own predictions (same function, same batches), not a
    # recomputation that is merely close
    assert result.steps == 0
    assert result.test == base_test and result.val == base_val
    # and row by row: every device's logits are Base's
    stage = _test_stage(data, 12)
    ft = finetune.run_stage(model, params[name], stage, _config(params=mode), 1e-2, (0,), "t",
                            EVAL_BATCH)
    base = predict(logits_fn, params[name], data.test, EVAL_BATCH)
    np.testing.assert_array_equal(ft[0], base)


@pytest.mark.parametrize("mode", finetune.PARAM_MODES)
def test_vmapped_groups_equal_a_loop_over_single_devices(setup, mode):
    data, models, params = setup
    model = models["sasrec"]
    stage = _test_stage(data, 12)
    grouped = finetune.run_stage(model, params["sasrec"], stage, _config(params=mode), 1e-2,
                                 (0, 3), "g")
    # the loop: each device alone, one at a time
    single = _config(params=mode, group_size=1)
    looped = np.zeros_like(grouped)
    for d in range(len(stage.devices)):
        one = dataclasses.replace(stage, devices=stage.devices[d : d + 1],
                                  tune_rows=stage.tune_rows[d : d + 1],
                                  eval_rows=stage.eval_rows[d : d + 1])
        out = finetune.run_stage(model, params["sasrec"], one, single, 1e-2, (0, 3), "l")
        rows = stage.eval_rows[d]
        looped[:, rows] = out[:, rows]
    np.testing.assert_array_equal(grouped[0], looped[0])  # 0 steps: Base's predictions
    # 3 steps: a group of 8 and a single device sum in other orders (batch shape)
    atol = _tuned_atol("sasrec", 3)
    tol.assert_within(grouped[1], looped[1], atol, "3 steps, group vs loop")
    # three steps did move the devices, by far more than the bound (so it is not vacuous)
    assert np.median(np.abs(grouped[1] - grouped[0])) > 5 * atol


def test_padding_a_devices_rows_does_not_change_its_result(setup):
    data, models, params = setup
    model = models["din"]
    stage = _test_stage(data, 12)
    assert max(len(r) for r in stage.tune_rows) <= 12  # so 40 only adds padding
    small = finetune.run_stage(model, params["din"], stage, _config(num_samples=12), 1e-2,
                               (3,), "s")
    padded = finetune.run_stage(model, params["din"], stage,
                                _config(num_samples=40, group_size=5), 1e-2, (3,), "p")
    # padded rows add exact zeros, but other shapes sum the real rows in other orders
    tol.assert_within(small, padded, _tuned_atol("din", 3), "12 vs 40 rows, group 8 vs 5")


def test_stages_take_each_devices_most_recent_rows(setup):
    data, _, _ = setup
    stage = _test_stage(data, 7)
    n_train = len(data.train)
    for u, tune, ev in zip(stage.devices, stage.tune_rows, stage.eval_rows, strict=True):
        mine = np.concatenate([np.flatnonzero(data.train.user == u),
                               n_train + np.flatnonzero(data.val.user == u)])
        np.testing.assert_array_equal(tune, mine[-7:])
        np.testing.assert_array_equal(ev, np.flatnonzero(data.test.user == u))
    assert set(stage.devices) == set(np.unique(data.test.user))
    counts = [len(r) for r in stage.eval_rows]
    assert counts == sorted(counts, reverse=True)


def test_validation_stage_tunes_on_train_rows_and_test_labels_cannot_steer_selection(setup):
    data, models, params = setup
    stage = finetune.make_stage([data.train], data.val, data.num_users, 7)
    for u, tune, ev in zip(stage.devices, stage.tune_rows, stage.eval_rows, strict=True):
        np.testing.assert_array_equal(tune, np.flatnonzero(data.train.user == u)[-7:])
        np.testing.assert_array_equal(ev, np.flatnonzero(data.val.user == u))
    config = _config(steps=(1, 4), learning_rates=(1e-3, 3e-2))
    model = models["sasrec"]
    result = finetune.finetune_and_evaluate(model, params["sasrec"], data, config)
    flipped = dataclasses.replace(
        data, test=dataclasses.replace(data.test, label=1.0 - data.test.label)
    )
    again = finetune.finetune_and_evaluate(model, params["sasrec"], flipped, config)
    # bitwise: the same computations on the same rows in one process (XLA is deterministic)
    assert again.grid == result.grid  # selection saw validation only
    assert (again.learning_rate, again.steps) == (result.learning_rate, result.steps)
    assert again.test["auc"] != result.test["auc"]


def test_val_split_tunes_on_early_validation_events_and_scores_the_late_ones(setup):
    data, models, params = setup
    early, late = finetune.split_in_time(data.val, data.num_users)
    assert len(early) + len(late) == len(data.val)
    for u in np.unique(data.val.user):
        e_pos = early.position[early.user == u]
        l_pos = late.position[late.user == u]
        events = np.unique(data.val.position[data.val.user == u])
        assert len(np.unique(e_pos)) == len(events) // 2
        if len(e_pos):
            assert e_pos.max() < l_pos.min()  # tuning data strictly precede scored data
    # each event (a positive and its negatives) stays on one side, so both sides keep the
    # validation split's class balance
    pos_rate = data.val.label.mean()
    for part in (early, late):
        positives = part.label.sum()
        assert len(part) == pytest.approx(positives / pos_rate)
    # without positions (authors' files), runs of equal click_seq rows are the events
    no_pos = dataclasses.replace(data.val, position=None)
    e2, l2 = finetune.split_in_time(no_pos, data.num_users)
    np.testing.assert_array_equal(e2.label, early.label)
    np.testing.assert_array_equal(l2.target, late.target)

    config = _config(steps=(1, 4), learning_rates=(1e-3, 3e-2), selection="val_split")
    model = models["sasrec"]
    result = finetune.finetune_and_evaluate(model, params["sasrec"], data, config)
    # the early validation events' labels steer tuning, never the late ones' scores directly
    flipped = dataclasses.replace(data, test=dataclasses.replace(
        data.test, label=1.0 - data.test.label))
    again = finetune.finetune_and_evaluate(model, params["sasrec"], flipped, config)
    assert again.grid == result.grid
    # the selection scores are computed on the late events only: equal to scoring them alone
    stage = finetune.make_stage([data.train, early], late, data.num_users, config.num_samples)
    for u, tune in zip(stage.devices, stage.tune_rows, strict=True):
        n_train = len(data.train)
        mine = np.concatenate([np.flatnonzero(data.train.user == u),
                               n_train + np.flatnonzero(early.user == u)])
        np.testing.assert_array_equal(tune, mine[-config.num_samples:])
    assert set(result.val) == set(result.test)


def test_fine_tuning_lowers_each_devices_own_loss(setup):
    data, models, params = setup
    model = models["sasrec"]
    stage = _test_stage(data, 12)
    _, _, tune, _, _ = next(finetune.stage_groups(stage, 8, 12))
    head0 = params["sasrec"]["head"]
    heads = finetune.finetune_params(model, "head", head0, params["sasrec"]["backbone"], tune,
                                     jnp.float32(1e-2), 10)

    def loss(head, rows):
        feats = model.encode(params["sasrec"]["backbone"], rows)
        return finetune._bce(model.head_logits(head, feats), rows["label"], rows["weight"])

    # lower by more than float32 rounding could move it: the logits' pair bound (|dBCE/dx|
    # <= 1) plus the mean over <= 12 rows
    config = tiny_config()
    forward = tol.model_roundings("sasrec", config.embed_dim, config.seq_len,
                                  config.sasrec.num_heads)
    margin = tol.f32_pair_atol(forward + tol.path_roundings(12), tol.MODEL_SCALE)
    for d in range(8):
        rows = jax.tree.map(lambda x, d=d: x[d], tune)
        if rows["weight"].sum() == 0:
            continue
        head = jax.tree.map(lambda x, d=d: x[d], heads)
        assert loss(head, rows) < loss(head0, rows) - margin


@pytest.mark.parametrize(
    "field, value",
    [("steps", ()), ("steps", (1, -2)), ("steps", (3, 3)), ("learning_rates", (0.0,)),
     ("params", "backbone"), ("num_samples", 0), ("group_size", 0),
     ("selection_devices", -1)],
)
def test_bad_finetune_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"config\.finetune\.{field}"):
        finetune.FinetuneConfig(**{field: value})
    config = tiny_config()
    config.methods = "base,finetune"
    config.finetune[field] = value
    with pytest.raises(ConfigError, match=rf"config\.finetune\.{field}"):
        config_lib.validate(config)


def test_an_interrupted_selection_resumes_after_its_last_finished_learning_rate(
        setup, tmp_path, monkeypatch):
    data, models, params = setup
    model = models["sasrec"]
    config = _config(steps=(0, 1, 3), learning_rates=(1e-3, 1e-2))
    identity = {"base": "digest", "data": "fingerprint"}
    store = (str(tmp_path), identity)
    want = finetune.finetune_and_evaluate(model, params["sasrec"], data, config,
                                          eval_batch_size=EVAL_BATCH, store=store)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "parts", "val_logits_lr0.001.npy", "val_logits_lr0.001.npy.json",
        "val_logits_lr0.01.npy", "val_logits_lr0.01.npy.json"]
    # a learning rate's parts go once its logits are stored whole; the test stage's stay
    # until the caller has stored the test logits
    test_parts = f"test_lr{want.learning_rate:g}_steps{want.steps}"
    assert [p.name for p in (tmp_path / "parts").iterdir()] == (
        [test_parts] if want.steps else [])
    # the run "stopped" after the first learning rate: only the second's part is redone
    (tmp_path / "val_logits_lr0.01.npy.json").unlink()
    stages = []
    real = finetune.run_stage
    monkeypatch.setattr(finetune, "run_stage",
                        lambda *a, **k: stages.append(a[6]) or real(*a, **k))
    got = finetune.finetune_and_evaluate(model, params["sasrec"], data, config,
                                         eval_batch_size=EVAL_BATCH, store=store)
    assert stages == ["finetune val lr=0.01", "finetune test"]
    # the same numbers: stored logits are the ones computed (bitwise, same process)
    assert got.grid == want.grid and got.test == want.test
    assert (got.learning_rate, got.steps) == (want.learning_rate, want.steps)
    # other inputs (another identity): nothing stored is reused
    stages.clear()
    finetune.finetune_and_evaluate(model, params["sasrec"], data, config,
                                   eval_batch_size=EVAL_BATCH,
                                   store=(str(tmp_path), {**identity, "base": "other"}))
    assert stages == ["finetune val lr=0.001", "finetune val lr=0.01", "finetune test"]


def test_an_interrupted_stage_resumes_after_its_last_finished_part(setup, tmp_path,
                                                                    monkeypatch):
    data, models, params = setup
    model = models["sasrec"]
    config = _config(steps=(0, 2), params="all", group_size=4)
    stage = _test_stage(data, config.num_samples)
    groups = -(-len(stage.devices) // config.group_size)
    monkeypatch.setattr(finetune, "PART_GROUPS", 2)
    parts = -(-groups // 2)
    assert parts >= 3  # enough parts to lose one in the middle
    want = finetune.run_stage(model, params["sasrec"], stage, config, 1e-2, (0, 2), "test")
    calls = []
    real = finetune.finetune_and_score
    monkeypatch.setattr(finetune, "finetune_and_score",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    store = (str(tmp_path), {"base": "digest"})
    got = finetune.run_stage(model, params["sasrec"], stage, config, 1e-2, (0, 2), "test",
                             parts=store)
    np.testing.assert_array_equal(got, want)  # stored parts lay out as one pass does
    names = [f"part{n:05d}.npy" for n in range(parts)]
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == names
    assert len(calls) == groups
    # the run "stopped" during part 1 (its record never written) and part 2's file is damaged
    (tmp_path / "part00001.npy.json").unlink()
    (tmp_path / "part00002.npy").write_bytes(b"not an array")
    calls.clear()
    got = finetune.run_stage(model, params["sasrec"], stage, config, 1e-2, (0, 2), "test",
                             parts=store)
    np.testing.assert_array_equal(got, want)
    assert len(calls) == 2 + min(2, groups - 4)  # those two parts' groups, nothing else
    # other inputs: nothing stored is reused
    calls.clear()
    finetune.run_stage(model, params["sasrec"], stage, config, 1e-2, (0, 2), "test",
                       parts=(str(tmp_path), {"base": "other"}))
    assert len(calls) == groups


def test_local_items_renumber_each_devices_own_ids(setup):
    data, _, _ = setup
    _, _, tune, evaluate, _ = next(finetune.stage_groups(_test_stage(data, 12), 8, 12))
    before = {f: tune[f].copy() for f in finetune.ITEM_ID_FIELDS}
    rows, (local_tune, local_eval) = finetune.local_items(tune, evaluate)
    groups, width = rows.shape
    assert groups == 8 and width >= 8 and width & (width - 1) == 0  # a power of two
    for d in range(groups):
        read = np.concatenate([np.ravel(b[f][d]) for b in (tune, evaluate)
                               for f in finetune.ITEM_ID_FIELDS])
        ids = np.union1d(read, [0])  # ascending, padding (0) first
        np.testing.assert_array_equal(rows[d, : len(ids)], ids)
        assert not rows[d, len(ids):].any()  # filled with padding
        for new, old in ((local_tune, tune), (local_eval, evaluate)):
            for f in finetune.ITEM_ID_FIELDS:
                np.testing.assert_array_equal(rows[d][new[f][d]], old[f][d])  # same items
                assert (new[f][d] == 0).tolist() == (old[f][d] == 0).tolist()  # same padding
            for f in ("label", "weight"):
                np.testing.assert_array_equal(new[f], old[f])
    for f in finetune.ITEM_ID_FIELDS:
        np.testing.assert_array_equal(tune[f], before[f])  # the input is not renumbered


# one model in the default run (the renumbering is model-agnostic: ITEM_ID_FIELDS and
# ITEM_TABLES); the other two (50-60 s each on 2 shared cores) in the slow run
@pytest.mark.parametrize("name", ["sasrec", pytest.param("gru4rec", marks=pytest.mark.slow),
                                  pytest.param("din", marks=pytest.mark.slow)])
def test_fine_tuning_each_devices_own_item_rows_is_fine_tuning_the_whole_table(setup, name):
    data, models, params = setup
    model, base = models[name], params[name]
    assert model.item_tables == ("item_embedding",)
    _, count, tune, evaluate, _ = next(finetune.stage_groups(_test_stage(data, 12), 8, 12))
    lr, table = jnp.float32(1e-2), base["backbone"]["item_embedding"]
    rows, (local_tune, local_eval) = finetune.local_items(tune, evaluate)
    assert rows.shape[1] < table.shape[0]  # a real cut of the table
    whole = finetune.finetune_and_score(model, "all", base, None, tune, evaluate, lr, (1, 3))
    local = finetune.finetune_and_score(model, "all", base, None, local_tune, local_eval, lr,
                                        (1, 3), rows)
    # the same float32 operations on the same rows, except that the table's gradient is
    # scattered into a smaller array (its summation order may differ): two orders
    atol = _tuned_atol(name, 3)
    tol.assert_within(local, whole, atol, f"{name}: own item rows vs whole table")
    moved = np.median(np.abs(np.asarray(whole[1]) - np.asarray(whole[0])))
    assert moved > 5 * atol  # steps 1 -> 3 moved the logits: the check is not vacuous
    # why it holds: after Adam steps, every row a device's rows do not read is Base's,
    # bit for bit, and the rows it reads are the local table's
    tune_rows, (own_tune,) = finetune.local_items(tune)
    full = finetune.finetune_params(model, "all", base, None, tune, lr, 3)
    own = finetune.finetune_params(model, "all", base, None, own_tune, lr, 3, tune_rows)
    full_table = np.asarray(full["backbone"]["item_embedding"])
    own_table = np.asarray(own["backbone"]["item_embedding"])
    for d in range(count):
        read = np.unique(tune_rows[d])
        unread = np.setdiff1d(np.arange(table.shape[0]), read)
        np.testing.assert_array_equal(full_table[d][unread], np.asarray(table)[unread])
        assert np.abs(full_table[d][read[1:]] - np.asarray(table)[read[1:]]).max() > 0
        # a parameter moves at most lr per Adam step; two summation orders of its gradient
        # change that step by a float32 rounding of it, far below a wrong row's lr-sized gap
        tol.assert_within(own_table[d][: len(read)], full_table[d][read],
                          3 * float(lr) * 1e-3, f"{name}: device {d}'s rows")


def test_selection_samples_devices_and_the_test_stage_runs_every_device(setup):
    data, models, params = setup
    users = np.unique(data.val.user)
    sample = finetune.sample_devices(data.val, 5, seed=3)
    kept = np.unique(sample.user)
    assert len(kept) == 5 and set(kept) <= set(users)
    for u in kept:  # every row of a kept device, in storage order
        np.testing.assert_array_equal(sample.target[sample.user == u],
                                      data.val.target[data.val.user == u])
    again = finetune.sample_devices(data.val, 5, seed=3)
    np.testing.assert_array_equal(again.user, sample.user)  # seeded
    others = [set(np.unique(finetune.sample_devices(data.val, 5, seed=s).user))
              for s in range(4, 8)]
    assert any(o != set(kept) for o in others)  # the seed draws the sample
    assert finetune.sample_devices(data.val, 0, seed=3) is data.val  # 0: every device
    assert finetune.sample_devices(data.val, len(users), seed=3) is data.val

    config = _config(steps=(0, 1), selection_devices=5, seed=3)
    result = finetune.finetune_and_evaluate(models["din"], params["din"], data, config,
                                            eval_batch_size=EVAL_BATCH)
    assert result.selection_devices == 5
    assert result.devices == len(np.unique(data.test.user))
    # validation metrics are the sample's: Base (0 steps) scored on the kept devices' rows
    logits_fn = jax.jit(base_method(models["din"]).logits)
    base_on_sample = evaluate(logits_fn, params["din"], sample, EVAL_BATCH)
    assert result.grid[0]["steps"] == 0
    assert result.grid[0]["val"]["auc"] == pytest.approx(base_on_sample["auc"], abs=1e-12)


def test_adaptation_is_timed_on_a_few_groups(setup, monkeypatch):
    data, models, params = setup
    stage = _test_stage(data, 12)
    config = _config(params="all")
    calls = []
    real = finetune.finetune_params
    monkeypatch.setattr(finetune, "finetune_params",
                        lambda *a, **k: calls.append(a[4]["label"].shape) or real(*a, **k))
    seconds = finetune.time_adaptation(models["sasrec"], params["sasrec"], stage, config,
                                       1e-2, 2, max_groups=2)
    assert seconds > 0
    assert len(calls) == 3 and all(c == (8, 12) for c in calls)  # warm-up + 2 groups
