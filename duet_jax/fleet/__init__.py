"""Device-cloud fleet simulation: rounds, request policies, uploads, generation, delivery.

**Streams** (:mod:`.streams`). Each device's device-test period is a chronological stream of
*events*; an event is one interaction (a position of
:func:`~duet_jax.data.samples.build_samples`) with its labelled samples (the positive and its
sampled negatives), which all share the sequence before the event (``click_seq``).

**Rounds.** Each device's stream is cut into ``T`` chunks of nearly equal length: event
``k`` of a device with ``n`` events falls in round ``k * T // n`` (a device with fewer than
``T`` events skips some rounds). A device is *online* in a round when it has events in it.

**One round** ``r``, for every online device (:mod:`.simulator`):
1. It has received the interactions of its earlier rounds: its sequence is the sequence at
   the start of the round, ``click_seq`` of its first event in ``r``. Nothing of round
   ``r`` itself is in it, so the items about to be scored never leak into a trigger.
2. Its policy (:mod:`.policies`) decides whether to request new parameters. A device
   without a head (its first online round, the start of its device period) always requests.
3. Requests go up (raw ids or z, see :mod:`duet_jax.cloud`); the cloud answers all of the
   round's requests in batched jitted generation, and sends each head down in the delivery
   format (:mod:`duet_jax.delivery`). The device decodes it and swaps it in.
4. The device scores every sample of its round-``r`` events with the head it holds, fresh
   or stale. Then those interactions join its sequence.

Base, the static cloud head, is scored alongside as the no-adaptation reference.
*Staleness* of a scored sample is the number of its device's interactions between the
trigger of the head it is scored with and the sample's own event (0 = fresh). What each
round and each whole run records is in :mod:`.records`; :class:`FleetConfig`
(:mod:`.config`) holds every setting and its default.
"""

from duet_jax.fleet.config import FleetConfig
from duet_jax.fleet.policies import (
    DISTANCES,
    POLICIES,
    embedding_distance,
    recent_mean_embedding,
    wants_request,
)
from duet_jax.fleet.records import PolicyRun, round_record, totals
from duet_jax.fleet.simulator import Simulator, direct_logits
from duet_jax.fleet.streams import Streams, build_streams, start_of_round_samples

__all__ = [
    "DISTANCES",
    "POLICIES",
    "FleetConfig",
    "PolicyRun",
    "Simulator",
    "Streams",
    "build_streams",
    "direct_logits",
    "embedding_distance",
    "recent_mean_embedding",
    "round_record",
    "start_of_round_samples",
    "totals",
    "wants_request",
]
