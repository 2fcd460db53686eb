"""Device request streams: device-test samples -> per-device events cut into rounds.

Events come from a :class:`SampleSet` in storage order: rows of one device contiguous,
consecutive rows with the same ``click_seq`` one event (a second positive among them starts
another), as :func:`~duet_jax.data.samples.build_samples` writes them. Event ``k`` of a
device with ``n`` events falls in round ``k * T // n``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from duet_jax.data.samples import SampleSet
from duet_jax.errors import ConfigError, DataError


@dataclasses.dataclass
class Streams:
    """The fleet's events, sorted by (device, time); ``E`` events, ``S`` samples, ``U`` devices."""

    samples: SampleSet  # the scored samples, grouped by event in event order
    devices: np.ndarray  # [U] user id of each device slot
    slot: np.ndarray  # [E] device slot of each event
    index: np.ndarray  # [E] position of the event in its device's stream (0-based)
    round: np.ndarray  # [E] round of the event
    seq: np.ndarray  # [E, L] the device's sequence before the event (its click_seq)
    sample_event: np.ndarray  # [S] event of each sample
    num_rounds: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def sample_slot(self) -> np.ndarray:
        """``[S]`` device slot of each sample."""
        return self.slot[self.sample_event]

    def first_event(self, r: int) -> np.ndarray:
        """``[U]`` each device's first event in round ``r``; -1 where it is offline."""
        out = np.full(self.num_devices, -1, np.int64)
        events = np.flatnonzero(self.round == r)
        slots, first = np.unique(self.slot[events], return_index=True)  # events are in time order
        out[slots] = events[first]
        return out

    def round_samples(self, r: int) -> np.ndarray:
        """Indices of the samples scored in round ``r``."""
        return np.flatnonzero(self.round[self.sample_event] == r)


def build_streams(
    samples: SampleSet, num_rounds: int, num_devices: int = 0, seed: int = 0
) -> Streams:
    """Events and rounds from device-test samples (module docstring); ``num_devices > 0``
    takes that many devices, drawn without replacement with ``seed``."""
    users = samples.user
    n = len(users)
    if n == 0:
        raise DataError("no device-test samples to simulate a fleet on")
    new_block = np.r_[True, users[1:] != users[:-1]]
    block_users = users[new_block]
    if len(np.unique(block_users)) != len(block_users):
        raise DataError(
            "device-test samples are not grouped by device: one user's rows appear in several "
            "blocks; the fleet needs each device's samples contiguous and in time order"
        )
    chosen = np.unique(block_users)
    if num_devices:
        if num_devices > len(chosen):
            raise ConfigError(
                "config.fleet.num_devices", num_devices,
                f"at most the {len(chosen)} devices with a device-test period (or 0 = all)",
            )
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(chosen, size=num_devices, replace=False))
    keep = np.flatnonzero(np.isin(users, chosen))
    samples = SampleSet(**samples.take(keep))
    users, seqs = samples.user, samples.click_seq
    group = np.r_[True, (users[1:] != users[:-1]) | np.any(seqs[1:] != seqs[:-1], axis=1)]
    # Repeated items can make two consecutive positions share a full window: a second
    # positive within one (user, click_seq) group starts a new event (positives lead their
    # negatives, as build_samples writes them).
    positives = np.cumsum(samples.label > 0)
    before = positives - (samples.label > 0)  # positives strictly before each row
    group_start = np.maximum.accumulate(np.where(group, np.arange(len(users)), 0))
    new_event = group | ((samples.label > 0) & (before > before[group_start]))
    sample_event = np.cumsum(new_event) - 1
    starts = np.flatnonzero(new_event)
    event_user = users[starts]
    slot = np.searchsorted(chosen, event_user)
    first_of_device = np.r_[True, event_user[1:] != event_user[:-1]]
    device_start = np.maximum.accumulate(np.where(first_of_device, np.arange(len(starts)), 0))
    index = np.arange(len(starts)) - device_start
    length = np.bincount(slot, minlength=len(chosen))[slot]
    return Streams(
        samples=samples,
        devices=chosen.astype(np.int64),
        slot=slot.astype(np.int64),
        index=index.astype(np.int64),
        round=(index * num_rounds // length).astype(np.int64),
        seq=seqs[starts],
        sample_event=sample_event.astype(np.int64),
        num_rounds=num_rounds,
    )


def start_of_round_samples(streams: Streams) -> SampleSet:
    """The streams' samples with ``trigger_seq`` = the device's sequence at the start of the
    sample's round (what ``every_round`` requests with)."""
    first_in_round = np.full((streams.num_devices, streams.num_rounds), -1, np.int64)
    for r in range(streams.num_rounds):
        first_in_round[:, r] = streams.first_event(r)
    event = streams.sample_event
    trigger = first_in_round[streams.slot[event], streams.round[event]]
    arrays = streams.samples.arrays()
    arrays["trigger_seq"] = streams.seq[trigger]
    return SampleSet(**arrays)
