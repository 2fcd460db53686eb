import dataclasses
import importlib.util
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import training
from duet_jax.epoch_log import read_metrics, tensorboard_tag
from duet_jax.errors import ConfigError
from duet_jax.methods import Method, get_method
from duet_jax.models import get_model
from duet_jax.training import TrainConfig, train_and_evaluate
from experiments import experiment
from experiments.config import model_config, train_config
from tests.conftest import tiny_config


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between steps, without saving anything."""


@pytest.fixture(scope="module")
def data():
    return experiment.load_data(tiny_config())


def _method(name, data):
    config = tiny_config()
    model = get_model("gru4rec", model_config(config, data.num_items))
    return get_method(name, model)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _steps_per_epoch(data):
    return -(-len(data.train) // train_config(tiny_config()).batch_size)


def _without_seconds(history):
    """Wall-clock seconds differ between runs; every other field must not."""
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def _tensorboard_scalars(logdir) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar in the event files under ``logdir``.

    Event files are TFRecords: u64 length, u32 crc, payload (an Event proto), u32 crc."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.iterdir()):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def _check_epoch_logs(workdir, history):
    """metrics.jsonl and (when tensorboardX imports) TensorBoard hold each epoch once."""
    # JSON floats round-trip exactly (shortest repr), so the lines equal the history.
    assert read_metrics(str(workdir)) == history
    board = workdir / "tensorboard"
    if importlib.util.find_spec("tensorboardX") is None:
        assert not board.exists()
        return
    expected = []
    for entry in history:
        expected.append(("train/loss", entry["step"], np.float32(entry["train_loss"])))
        expected += [
            (tensorboard_tag(f"val/{k}"), entry["step"], np.float32(v))
            for k, v in entry["val"].items()
        ]
    # TensorBoard stores float32 scalars: the values match after the same float32 rounding.
    assert sorted(_tensorboard_scalars(board)) == sorted(expected)


# mid-epoch resumption once in the default run (DUET: the larger state); Base's in the slow run
@pytest.mark.parametrize(
    "method,where", [pytest.param("base", "mid-epoch", marks=pytest.mark.slow),
                     ("duet", "mid-epoch"), ("base", "epoch-end")]
)
def test_killed_then_resumed_run_ends_with_identical_parameters(method, where, data, tmp_path):
    config = train_config(tiny_config())  # 2 epochs, checkpoints every 7 steps and per epoch
    full = train_and_evaluate(_method(method, data), data, config, str(tmp_path / "full"), seed=0)
    # mid-epoch: after the step-14 checkpoint; epoch-end: after the last step of epoch 1,
    # before its validation and checkpoint
    kill_step = 17 if where == "mid-epoch" else _steps_per_epoch(data)
    # no checkpoint is written at the kill step (mid-epoch saves skip epoch ends)
    assert kill_step % 7 or kill_step == _steps_per_epoch(data)

    def kill_at(step):
        if step == kill_step:
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_and_evaluate(_method(method, data), data, config, str(cut), seed=0, on_step=kill_at)
    # a run killed while writing a line, or after logging an epoch its checkpoint lost
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 99}\n{"epoch": 2, "st')
    resumed = train_and_evaluate(_method(method, data), data, config, str(cut), seed=0)
    assert resumed.steps == full.steps
    for a, b in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _without_seconds(resumed.history) == _without_seconds(full.history)
    assert resumed.test == full.test
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    _check_epoch_logs(cut, resumed.history)


# (3, 5, 1) also carries the patience counter across the budgets; (2, 3, 0) in the slow run
@pytest.mark.parametrize("first,then,patience",
                         [pytest.param(2, 3, 0, marks=pytest.mark.slow), (3, 5, 1)])
def test_a_larger_budget_continues_the_run_exactly(first, then, patience, data, tmp_path):
    # A high learning rate, so validation does not simply improve every epoch and the kept
    # epoch and patience are exercised (on this data some epochs do get worse).
    config = TrainConfig(
        num_epochs=then,
        patience=patience,
        batch_size=64,
        learning_rate=3e-2,
        checkpoint_every_steps=7,
        progress=False,
    )
    fresh = train_and_evaluate(_method("base", data), data, config, str(tmp_path / "a"), seed=0)
    short = dataclasses.replace(config, num_epochs=first)
    train_and_evaluate(_method("base", data), data, short, str(tmp_path / "b"), seed=0)
    # The same computation in the same process: extending must give the very same numbers.
    extended = train_and_evaluate(_method("base", data), data, config, str(tmp_path / "b"), seed=0)
    assert extended.steps == fresh.steps
    for a, b in zip(_leaves(fresh.params), _leaves(extended.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _without_seconds(extended.history) == _without_seconds(fresh.history)
    assert (extended.best_epoch, extended.val, extended.test) == (
        fresh.best_epoch,
        fresh.val,
        fresh.test,
    )
    _check_epoch_logs(tmp_path / "b", extended.history)
    # a budget below what the run has trained is refused, naming the field and the epochs
    with pytest.raises(
        ConfigError,
        match=r"config\.train\.num_epochs=1 is invalid: expected at least \d+ "
        r"\(or a fresh --workdir\): the run in .* has already trained \d+ epochs$",
    ):
        smaller = dataclasses.replace(config, num_epochs=1)
        train_and_evaluate(_method("base", data), data, smaller, str(tmp_path / "b"), seed=0)


def _history(aucs, steps_per_epoch):
    return [
        {"epoch": e, "step": e * steps_per_epoch, "val": {"auc": auc}}
        for e, auc in enumerate(aucs, 1)
    ]


def test_budget_rules_on_resume():
    """Which budgets a restored run may take: done (True), go on (False), or refused."""
    history = _history([0.5, 0.6, 0.55, 0.54, 0.7], 10)  # best so far: epochs 1 2 2 2 5

    def check(step, epochs, **budget):
        config = TrainConfig(**{"num_epochs": 5, "progress": False, **budget})
        return training._check_budget("w", history[:epochs], step, 10, config)

    assert check(50, 5) is True
    assert check(50, 5, num_epochs=6) is False
    assert check(50, 5, num_epochs=6, patience=3) is False  # never 3 epochs without progress
    with pytest.raises(ConfigError, match=r"num_epochs=4 .* at least 5 .* trained 5 epochs$"):
        check(50, 5, num_epochs=4)
    with pytest.raises(ConfigError, match=r"trained 4 epochs and 5 steps of epoch 5$"):
        check(45, 4, num_epochs=4)
    with pytest.raises(
        ConfigError,
        match=r"config\.train\.patience=2 is invalid: expected 0 or at least 3 .* "
        r"stopped after epoch 4, but .* trained 5 epochs$",
    ):
        check(50, 5, patience=2)
    # a run that patience 2 stopped after epoch 4 goes on under patience 3, not under 2
    assert check(40, 4, patience=2) is True
    assert check(40, 4, patience=3) is False
    with pytest.raises(ConfigError, match=r"patience=1 .* at least 2 .* after epoch 3"):
        check(40, 4, patience=1)


def test_train_config_fields_are_each_in_one_resume_group():
    groups = training.IDENTITY_FIELDS + training.BUDGET_FIELDS + training.COSMETIC_FIELDS
    assert sorted(groups) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def test_rerunning_a_finished_run_trains_no_more(data, tmp_path):
    config = train_config(tiny_config())
    first = train_and_evaluate(_method("base", data), data, config, str(tmp_path), seed=0)
    steps = []
    again = train_and_evaluate(
        _method("base", data), data, config, str(tmp_path), seed=0, on_step=steps.append
    )
    assert steps == [] and again.test == first.test


def test_keeps_the_best_validation_epoch(data, tmp_path):
    config = TrainConfig(num_epochs=4, batch_size=64, learning_rate=3e-2, progress=False)
    result = train_and_evaluate(_method("base", data), data, config, str(tmp_path), seed=0)
    val_aucs = [h["val"]["auc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(val_aucs)) + 1
    assert result.val["auc"] == max(val_aucs)


def test_training_learns_signal(data, tmp_path):
    config = TrainConfig(num_epochs=3, batch_size=32, learning_rate=1e-2, progress=False)
    result = train_and_evaluate(_method("base", data), data, config, str(tmp_path), seed=0)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.test["auc"] > 0.6


def test_same_seed_same_numbers_other_seed_other_numbers(data, tmp_path):
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    a = train_and_evaluate(_method("duet", data), data, config, str(tmp_path / "a"), seed=1)
    b = train_and_evaluate(_method("duet", data), data, config, str(tmp_path / "b"), seed=1)
    c = train_and_evaluate(_method("duet", data), data, config, str(tmp_path / "c"), seed=2)
    assert a.test == b.test and a.test != c.test


def test_resuming_with_another_config_is_refused_naming_only_what_differs(data, tmp_path):
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    workdir = str(tmp_path)
    train_and_evaluate(_method("base", data), data, config, workdir, seed=0, run_config={"lr": 1})

    def refused(method="base", splits=data, train=config, run_config=None):
        with pytest.raises(ConfigError) as error:
            train_and_evaluate(
                _method(method, data),
                splits,
                train,
                workdir,
                seed=0,
                run_config={"lr": 1} if run_config is None else run_config,
            )
        return str(error.value).split("(stored -> now): ")[1]

    assert refused(run_config={"lr": 2}) == "config.lr: 1 -> 2"
    assert refused(train=dataclasses.replace(config, learning_rate=0.01)) == (
        "config.train.learning_rate: 0.001 -> 0.01"
    )
    assert refused(train=dataclasses.replace(config, batch_size=32, select_metric="uauc")) == (
        "config.train.batch_size: 64 -> 32; config.train.select_metric: 'auc' -> 'uauc'"
    )
    assert refused(method="duet") == "method: 'base' -> 'duet'"
    shifted = dataclasses.replace(
        data, train=dataclasses.replace(data.train, label=1 - data.train.label)
    )
    assert refused(splits=shifted).startswith("data: '")
    # cosmetic fields may change, and a caller's "train" entry is left to TrainConfig
    steps = []
    cosmetic = dataclasses.replace(
        config, progress=True, eval_batch_size=7, checkpoint_every_steps=3
    )
    train_and_evaluate(
        _method("base", data),
        data,
        cosmetic,
        workdir,
        seed=0,
        run_config={"lr": 1, "train": {"learning_rate": 5}},
        on_step=steps.append,
    )
    assert steps == []


def test_a_field_added_later_resumes_at_its_default_and_is_refused_otherwise(data, tmp_path):
    """A run whose stored identity predates a field (here ``generator.encoder``) resumes when
    the field keeps its default, and is refused when the field is set to something else."""
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    workdir = str(tmp_path)
    old = {"lr": 1, "generator": {"hidden_dim": 32}}
    train_and_evaluate(_method("base", data), data, config, workdir, seed=0, run_config=old)
    defaults = {"generator": {"hidden_dim": 32, "encoder": "gru"}}

    def rerun(encoder):
        now = {"lr": 1, "generator": {"hidden_dim": 32, "encoder": encoder}}
        return train_and_evaluate(_method("base", data), data, config, workdir, seed=0,
                                  run_config=now, run_defaults=defaults)

    assert rerun("gru").history  # resumed: the stored run is complete
    with pytest.raises(ConfigError, match=r"config.generator.encoder: 'gru' -> 'attention'"):
        rerun("attention")
    with pytest.raises(ConfigError, match=r"config.generator.encoder: None -> 'gru'"):
        train_and_evaluate(_method("base", data), data, config, workdir, seed=0,
                           run_config={"lr": 1, "generator": {"hidden_dim": 32,
                                                              "encoder": "gru"}})


def test_a_run_config_in_an_older_layout_is_refused(data, tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"seed": 0, "train": {}}))
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    with pytest.raises(ConfigError, match=r"--workdir=.* older layout"):
        train_and_evaluate(_method("base", data), data, config, str(tmp_path), seed=0)


def test_without_tensorboardx_only_metrics_jsonl_is_written(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    result = train_and_evaluate(_method("base", data), data, config, str(tmp_path), seed=0)
    assert read_metrics(str(tmp_path)) == result.history
    assert not (tmp_path / "tensorboard").exists()


def test_diverged_training_fails_with_a_clear_error(data, tmp_path):
    base = _method("base", data)
    broken = Method("base", base.init, lambda p, b: base.logits(p, b) * jnp.nan)
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    with pytest.raises(FloatingPointError, match=r"validation after epoch 1.*diverged"):
        train_and_evaluate(broken, data, config, str(tmp_path), seed=0)


@pytest.mark.slow  # two training runs; tests/test_failure_modes.py checks the fallback itself
def test_a_damaged_newest_checkpoint_falls_back_and_ends_identical(data, tmp_path):
    """Kill a run, damage its newest checkpoint: the rerun restores the newest intact step,
    replays from there and ends with the parameters of an uninterrupted run."""
    config = train_config(tiny_config())  # checkpoints every 7 steps and per epoch
    full = train_and_evaluate(_method("base", data), data, config, str(tmp_path / "full"), seed=0)

    def kill_at(step):
        if step == 17:  # after the step-14 checkpoint (step 7 kept too: max_to_keep=2)
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_and_evaluate(_method("base", data), data, config, str(cut), seed=0, on_step=kill_at)
    newest = max(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    for path in (cut / "checkpoints" / str(newest)).rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0damaged")
    resumed = train_and_evaluate(_method("base", data), data, config, str(cut), seed=0)
    assert (cut / "checkpoints.corrupt" / str(newest)).is_dir()
    assert resumed.steps == full.steps and resumed.test == full.test
    for a, b in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
