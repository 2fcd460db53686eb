"""Methods: two-stage DUET keeps Base's backbone; the experiment runs every method."""

import json

import jax
import numpy as np
import pytest

from duet_jax.errors import ConfigError
from duet_jax.methods import DUET_VARIANTS, get_method
from duet_jax.models import get_model
from duet_jax.training import train_and_evaluate
from experiments import experiment
from experiments.config import model_config, train_config
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def data():
    return experiment.load_data(tiny_config())


def test_two_stage_trains_the_generator_on_a_frozen_base_backbone(data, tmp_path):
    config = tiny_config()
    model = get_model("sasrec", model_config(config, data.num_items))
    train = train_config(config)
    base = train_and_evaluate(get_method("base", model), data, train, str(tmp_path / "b"), 0)
    method = get_method("duet_two_stage", model, training="two_stage", base_params=base.params)
    init = method.init(jax.random.key(0))
    result = train_and_evaluate(method, data, train, str(tmp_path / "d"), 0)
    for got, want in zip(jax.tree.leaves(result.params["backbone"]),
                         jax.tree.leaves(base.params["backbone"]), strict=True):
        # bitwise: a stopped gradient is exactly 0, and Adam's step 0 / (sqrt(0) + eps) is 0
        np.testing.assert_array_equal(got, want)
    # Adam moves a trained parameter by about the learning rate (1e-3) a step: far beyond
    # allclose's float32-rounding-sized default (relative 1e-5)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(result.params["generator"]),
                                                   jax.tree.leaves(init["generator"]),
                                                   strict=True)]
    assert any(moved)
    with pytest.raises(ValueError, match="base_params"):
        get_method("duet_two_stage", model, training="two_stage")


@pytest.mark.slow  # trains all seven methods (about 1.5 minutes on 2 cores)
def test_experiment_runs_every_method_and_reuses_finished_work(data, tmp_path):
    config = tiny_config()
    config.methods = ",".join(["finetune", *DUET_VARIANTS])
    config.embed_dim = 16  # so k = 8 < 16 really is low rank
    config.train.num_epochs = 1
    config.finetune.steps = (0, 2)
    config.finetune.group_size = 16
    rows = experiment.run(config, str(tmp_path), data=data)
    # Base is trained first (fine-tuning and two-stage need it) and reported
    assert [r["method"] for r in rows] == ["base", "finetune", *DUET_VARIANTS]
    for row in rows:
        assert 0.0 <= row["auc"] <= 1.0
        assert (row.get("adapt_ms_per_device") is None) == (row["method"] == "base")
    ft = json.loads((tmp_path / "finetune" / "result.json").read_text())
    assert ft["result"]["steps"] in (0, 2) and len(ft["result"]["grid"]) == 4
    mtime = (tmp_path / "finetune" / "result.json").stat().st_mtime_ns
    again = experiment.run(config, str(tmp_path), data=data)
    # bitwise: restored parameters and stored results, the same code on the same machine
    assert [r["auc"] for r in again] == [r["auc"] for r in rows]
    assert (tmp_path / "finetune" / "result.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "field, value, match",
    [("generator.training", "both", r"config\.generator\.training"),
     ("generator.stabiliser", -1, r"config\.generator\.stabiliser"),
     ("generator.stabiliser_softmax", "heads", r"config\.generator\.stabiliser_softmax"),
     ("generator.low_rank", -2, r"config\.generator\.low_rank"),
     ("ablation.low_rank", 0, r"config\.ablation\.low_rank=0 .*switches it on"),
     ("train.select_metric", "acc", r"config\.train\.select_metric"),
     ("methods", "base,duet_big", r"config\.methods")],
)
def test_bad_method_options_name_the_field(field, value, match):
    from experiments import config as config_lib

    config = tiny_config()
    config.methods = "base,duet,duet_low_rank"
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config)
