"""A trained-run directory written the way training writes one, and engines/apps over it."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest

from duet_jax.checkpoint import Checkpointer
from duet_jax.duet import Duet
from duet_jax.methods import DuetOptions
from duet_jax.models import ModelConfig, get_model
from duet_jax.training import RUN_CONFIG_FORMAT, TrainState

NUM_ITEMS, SEQ_LEN, EMBED = 50, 6, 8


def write_run(run_dir: str, model_name: str = "gru4rec", seed: int = 0, step: int = 7,
              num_items: int = NUM_ITEMS, seq_len: int = SEQ_LEN) -> Duet:
    """``run_dir``: run_config.json and an orbax checkpoint holding the train state and the
    kept parameters (random, not trained: serving does not care)."""
    model = get_model(model_name, ModelConfig(num_items=num_items, seq_len=seq_len,
                                              embed_dim=EMBED, num_heads=2))
    options = DuetOptions(hidden_dim=EMBED, z_dim=EMBED)
    duet = Duet.create(model, **options.generator_kwargs())
    params = duet.init(jax.random.key(seed))
    identity = {"format": RUN_CONFIG_FORMAT, "method": "duet", "seed": seed, "data": "test",
                "config": {"model": model_name, "seq_len": seq_len, "embed_dim": EMBED,
                           "sasrec": {"num_heads": 2, "ffn_mult": 4, "mask_padding": False},
                           "generator": dataclasses.asdict(options),
                           "train": {"batch_size": 8, "learning_rate": 1e-3,
                                     "select_metric": "auc"}}}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run_config.json"), "w") as f:
        json.dump(identity, f)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       opt_state=optax.adam(1e-3).init(params))
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        ckpt.save(step, {"train": state, "best_params": params}, {"history": []})
    return duet


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("serving") / "duet")
    write_run(path)
    return path


@pytest.fixture(scope="session")
def loaded(run_dir):
    from duet_jax.serving.engine import load_run

    return load_run(run_dir)


@pytest.fixture(scope="session")
def engine(loaded):
    from duet_jax.serving.engine import Engine

    return Engine(loaded, max_batch=4)


def heads_atol() -> float:
    """|a head value from one float32 evaluation - another| (another batch shape or
    lowering of the same generator): GRU4Rec's sequence embedding (one Dense over D), a
    GRU step per position, the generator's Dense layers and a decoder, on sums of |terms|
    up to MODEL_SCALE (tests/tolerances.py)."""
    from tests import tolerances as tol

    roundings = tol.generator_roundings(SEQ_LEN, EMBED, EMBED, EMBED, embed=(EMBED,))
    return float(tol.f32_pair_atol(roundings, tol.MODEL_SCALE))
