"""Per-epoch records of a training run that users can watch while it trains.

``WORKDIR/metrics.jsonl`` gets one JSON line per epoch (the entries of
:attr:`duet_jax.training.TrainResult.history`: epoch, step, train_loss, val, seconds, best).
When ``tensorboardX`` imports (``pip install duet_jax[tensorboard]``), the same numbers go to
TensorBoard event files under ``WORKDIR/tensorboard``: scalars ``train/loss`` and
``val/<metric>`` (``@`` spelt ``_at_``) against the optimiser step. Both are rebuilt from the
checkpoint's history each time a run starts, so epochs of a killed run that its checkpoint
lost never linger.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

from duet_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class EpochLog:
    """``WORKDIR/metrics.jsonl`` (one JSON line per epoch) and, when tensorboardX imports,
    TensorBoard scalars ``train/loss`` and ``val/<metric>`` under ``WORKDIR/tensorboard``
    (x axis: optimiser steps). Both are rewritten from ``history`` (the epochs the run's
    checkpoint holds) when opened."""

    def __init__(self, workdir: str, history: list[dict]):
        self.path = os.path.join(workdir, METRICS_FILE)
        files.write_text_atomic(self.path, "".join(self._line(e) for e in history))
        self._writer = _tensorboard_writer(os.path.join(workdir, TENSORBOARD_DIR))
        for entry in history:
            self._scalars(entry)
        self._flush_tensorboard()

    @staticmethod
    def _line(entry: dict) -> str:
        return json.dumps(files.strict_json(entry), allow_nan=False) + "\n"

    def _scalars(self, entry: dict) -> None:
        if self._writer is not None:
            self._writer.add_scalar("train/loss", entry["train_loss"], entry["step"])
            for name, value in entry["val"].items():
                if value is not None:  # None: a metric undefined on this split
                    tag = tensorboard_tag(f"val/{name}")
                    self._writer.add_scalar(tag, value, entry["step"])

    def _flush_tensorboard(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def append(self, entry: dict) -> None:
        # One write of one whole line, then flush and fsync: a kill leaves whole lines only
        # (and the next start rewrites the file from the checkpoint anyway).
        with open(self.path, "a") as f:
            f.write(self._line(entry))
            f.flush()
            os.fsync(f.fileno())
        self._scalars(entry)
        self._flush_tensorboard()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard_tag(name: str) -> str:
    """``val/ndcg@10`` -> ``val/ndcg_at_10``: TensorBoard tags allow only ``[-/\\w.]``."""
    return re.sub(r"[^-/\w.]", "_", name.replace("@", "_at_"))


def _tensorboard_writer(logdir: str) -> Any:
    """A tensorboardX SummaryWriter on an emptied ``logdir``, or None without tensorboardX."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    except Exception as e:  # a broken install must not stop training; say so once
        logging.warning("tensorboardX failed to import (%s); not writing TensorBoard files", e)
        return None
    # Old event files may hold epochs the checkpoint no longer has; everything they had that
    # still counts is written again from the history.
    shutil.rmtree(logdir, ignore_errors=True)
    return SummaryWriter(logdir=logdir)


def read_metrics(workdir: str) -> list[dict]:
    """The entries of ``WORKDIR/metrics.jsonl``, one per epoch trained."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
