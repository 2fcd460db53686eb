import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duet_jax import experiment
from duet_jax.config import model_config, train_config
from duet_jax.errors import ConfigError
from duet_jax.methods import Method, get_method
from duet_jax.models import get_model
from duet_jax.training import TrainConfig, train_and_evaluate
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


@pytest.mark.parametrize(
    "method,where", [("base", "mid-epoch"), ("duet", "mid-epoch"), ("base", "epoch-end")]
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

    with pytest.raises(Killed):
        train_and_evaluate(
            _method(method, data), data, config, str(tmp_path / "cut"), seed=0, on_step=kill_at
        )
    resumed = train_and_evaluate(_method(method, data), data, config, str(tmp_path / "cut"), seed=0)
    assert resumed.steps == full.steps
    for a, b in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == full.history
    assert resumed.test == full.test


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


def test_resuming_with_another_config_is_refused(data, tmp_path):
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    train_and_evaluate(
        _method("base", data), data, config, str(tmp_path), seed=0, run_config={"lr": 1}
    )
    with pytest.raises(ConfigError, match=r"lr: 1 -> 2"):
        train_and_evaluate(
            _method("base", data), data, config, str(tmp_path), seed=0, run_config={"lr": 2}
        )
    other = TrainConfig(num_epochs=1, batch_size=32, progress=False)
    with pytest.raises(ConfigError, match=r"train: .*'batch_size': 64"):
        train_and_evaluate(_method("base", data), data, other, str(tmp_path), seed=0)
    with pytest.raises(ConfigError, match=r"method: 'base' -> 'duet'"):
        train_and_evaluate(_method("duet", data), data, config, str(tmp_path), seed=0)
    shifted = dataclasses.replace(
        data, train=dataclasses.replace(data.train, label=1 - data.train.label)
    )
    with pytest.raises(ConfigError, match=r"data: "):
        train_and_evaluate(_method("base", data), shifted, config, str(tmp_path), seed=0)
    # progress bars are cosmetic and may change
    quiet = dataclasses.replace(config, progress=True)
    train_and_evaluate(
        _method("base", data), data, quiet, str(tmp_path), seed=0, run_config={"lr": 1}
    )


def test_diverged_training_fails_with_a_clear_error(data, tmp_path):
    base = _method("base", data)
    broken = Method("base", base.init, lambda p, b: base.logits(p, b) * jnp.nan)
    config = TrainConfig(num_epochs=1, batch_size=64, progress=False)
    with pytest.raises(FloatingPointError, match=r"validation after epoch 1.*diverged"):
        train_and_evaluate(broken, data, config, str(tmp_path), seed=0)
