"""What DUET's adaptation costs a device: one generated head, timed like fine-tuning.

A device's adaptation is the head the cloud generates from its trigger sequence at the start
of its device-test period. Devices are generated in vmapped groups of the same size the
fine-tuning baseline uses (:class:`duet_jax.finetune.FinetuneConfig.group_size`), so the two
wall times per device compare like with like.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from duet_jax.data.samples import SampleSet
from duet_jax.duet import Duet
from duet_jax.finetune import rows_by_user


def device_triggers(samples: SampleSet, num_users: int) -> np.ndarray:
    """``[D, L]``: each user's trigger sequence at its first row of ``samples``."""
    first = [rows[0] for rows in rows_by_user(samples.user, num_users) if len(rows)]
    return samples.trigger_seq[np.asarray(first, np.int64)]


@functools.partial(jax.jit, static_argnums=0)
def _generate(duet: Duet, params: dict, seq: jax.Array):
    return duet.generate(params, seq)


def generation_seconds_per_device(duet: Duet, params: dict, samples: SampleSet,
                                  num_users: int, group_size: int) -> float:
    """Wall seconds per device to generate every device's head (after one warm-up group)."""
    triggers = device_triggers(samples, num_users)
    if not len(triggers):
        return float("nan")
    pad = -len(triggers) % group_size
    groups = np.concatenate([triggers, np.zeros((pad, triggers.shape[1]), triggers.dtype)])
    groups = groups.reshape(-1, group_size, triggers.shape[1])
    jax.block_until_ready(_generate(duet, params, groups[0]))
    started = time.perf_counter()
    for group in groups:
        jax.block_until_ready(_generate(duet, params, group))
    return (time.perf_counter() - started) / len(triggers)
