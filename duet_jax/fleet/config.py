"""``config.fleet`` as a validated dataclass: the one place the fleet's defaults and checks
live (``experiments/configs/fleet.py`` builds its ``ConfigDict`` from :class:`FleetConfig`)."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from duet_jax import delivery
from duet_jax.cloud import UPLOADS
from duet_jax.errors import ConfigError
from duet_jax.fleet.policies import DISTANCES, POLICIES
from duet_jax.xla_options import CPU_VECTOR_WIDTH, VECTOR_WIDTHS

# fields a config file writes as comma-separated strings ("never,every_round")
LIST_FIELDS = ("policies", "formats")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """``config.fleet``: who takes part, how rounds and requests work, what is sent."""

    num_devices: int = 0  # N: 0 = every device with a device-test period
    num_rounds: int = 10  # T: each device's device-test stream is cut into T chunks
    # request policies to compare: every_round, every_k_items, drift_threshold, never (the
    # head of the first sync, never refreshed)
    policies: tuple[str, ...] = POLICIES
    every_k: int = 3  # every_k_items: new items since the last request
    threshold: float = 0.1  # drift_threshold: distance that triggers a request
    drift_window: int = 5  # drift_threshold: recent items whose mean embedding is compared
    distance: str = "cosine"  # drift_threshold: cosine (1 - cos) or l2
    formats: tuple[str, ...] = delivery.FORMATS  # delivery formats of the heads sent down
    upload: str = "ids"  # ids (raw item ids) | z (embedding only: privacy-preserving)
    base: bool = True  # also score Base, the static cloud head
    min_bucket: int = 64  # cloud batches: powers of two in [min_bucket, max_bucket]
    max_bucket: int = 4096
    # the cloud's generation on CPU: LLVM vector width in bits (0 = XLA's default), as
    # experiments.serve's --cpu_vector_width; ignored on other backends
    vector_width: int = CPU_VECTOR_WIDTH
    score_batch_size: int = 2048  # device-side scoring, rows per jitted call
    seed: int = 0  # which devices take part when num_devices < all
    progress: bool = True
    # True: keep every device's delivered head in a [devices, values] table per format (the
    # original simulation). False: keep only each device's trigger event and regenerate the
    # heads of the devices being scored, chunk by chunk (memory no longer grows with
    # devices x head size; generation runs again for scoring, untimed). Same scores up to
    # float rounding of a different batch composition.
    keep_heads: bool = True

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.fleet.{name}", getattr(self, name), expected)

        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        for name, low in [("num_devices", 0), ("num_rounds", 1), ("every_k", 1),
                          ("drift_window", 1), ("min_bucket", 1), ("max_bucket", 1),
                          ("score_batch_size", 1), ("seed", 0)]:
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, f"an integer >= {low}")
        if self.vector_width not in VECTOR_WIDTHS or isinstance(self.vector_width, bool):
            fail("vector_width", f"one of {list(VECTOR_WIDTHS)} (bits; 0 = XLA's default)")
        if self.max_bucket < self.min_bucket:
            fail("max_bucket", f"an integer >= min_bucket ({self.min_bucket})")
        for name, known in [("policies", POLICIES), ("formats", delivery.FORMATS)]:
            value = getattr(self, name)
            if not value or any(v not in known for v in value) or len(set(value)) != len(value):
                fail(name, f"a comma-separated list of distinct names from {list(known)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not np.isfinite(t) or t < 0:
            fail("threshold", "a finite number >= 0")
        if self.distance not in DISTANCES:
            fail("distance", f"one of {list(DISTANCES)}")
        if self.upload not in UPLOADS:
            fail("upload", f"one of {list(UPLOADS)}")
        for name in ("base", "progress", "keep_heads"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")

    @classmethod
    def from_config(cls, fleet: ml_collections.ConfigDict) -> FleetConfig:
        """From ``config.fleet``; comma-separated strings become tuples. Unknown fields raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in fleet.items():
            if name not in fields:
                raise ConfigError(f"config.fleet.{name}", value, f"a known field: {sorted(fields)}")
            if name in LIST_FIELDS and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif name in LIST_FIELDS and isinstance(value, list | tuple):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:  # report the value as the user wrote it, not the tuple
            name = err.field.rsplit(".", 1)[-1]
            raise ConfigError(err.field, fleet.get(name, err.value), err.expected) from None

    def to_config(self) -> ml_collections.ConfigDict:
        """The inverse of :meth:`from_config`: every field in declaration order, the lists as
        comma-separated strings (so ``--config.fleet.policies=never,every_round`` parses as a
        string and a bad name reaches :meth:`from_config`, which names the field)."""
        fields = dataclasses.asdict(self)
        for name in LIST_FIELDS:
            fields[name] = ",".join(fields[name])
        return ml_collections.ConfigDict(fields)
