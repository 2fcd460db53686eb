"""A synthetic fleet of devices whose behaviour drifts: the offline default data.

The world (all sizes are fields of :class:`SyntheticConfig`):
- Items belong to ``num_categories`` categories; an item's latent vector is its category's
  one-hot vector plus Gaussian noise of norm about ``item_noise`` (normalised), and items
  have Zipf popularity ``pop_i``.
- A *style* is a permutation ``T_s`` of the categories describing how a user moves on from
  one item to the next: the next item is drawn with probability
  ``∝ exp(β_seq <T_s v_prev, v_i> + β_pref <u, v_i> + γ log pop_i)`` among items the user
  has not touched yet, where ``u`` is the user's long-term preference over categories.
  Style 0 is the identity ("more of the same"); the others are random permutations.
- Drift is the only way a user departs from the mainstream. Every user starts in style 0.
  After each interaction a user switches to another random style with probability
  ``drift_rate``, so the cloud data hold users who have drifted, at different times. At the
  start of its device period each device drifts again: it switches style with probability
  ``drift``, and its preference turns by ``preference_drift`` towards a random direction.

Why this is honest: the cloud model is trained on everyone's cloud periods and can learn
popularity, preference and the population's transition habits (AUC well above 0.5). A
device's own recent items reveal its current style, so a head generated from them can follow
its drift, while one static head must serve every style at once. With
``drift = drift_rate = preference_drift = 0`` every user behaves like the mainstream all
the time, and there is nothing for adaptation to gain.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from duet_jax.data.samples import SampleConfig, Splits, build_samples
from duet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 3000
    num_items: int = 2000
    num_categories: int = 20
    item_noise: float = 0.3  # expected norm of an item's offset from its category's unit vector
    num_styles: int = 8
    drift_rate: float = 0.03  # per interaction: chance a user switches to another style
    drift: float = 1.0  # chance a device switches style when its device period starts
    preference_drift: float = 0.5  # how far its preference turns then (0 = not at all)
    cloud_len: tuple[int, int] = (30, 50)  # inclusive range of cloud-period lengths
    device_len: tuple[int, int] = (10, 20)  # inclusive range of device-period lengths
    val_frac: float = 0.15  # last fraction of the cloud period held out for validation
    transition_strength: float = 6.0  # β_seq
    preference_strength: float = 3.0  # β_pref
    popularity_strength: float = 1.0  # γ
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"config.data.{name}", getattr(self, name), expected)

        for name in ("num_users", "num_items", "num_categories", "num_styles"):
            if getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        for name in ("drift_rate", "drift", "preference_drift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "a number in [0, 1]")
        if self.item_noise < 0:
            fail("item_noise", "a number >= 0")
        if not 0.0 < self.val_frac < 1.0:
            fail("val_frac", "a number in (0, 1)")
        for name in ("cloud_len", "device_len"):
            value = getattr(self, name)
            if not (isinstance(value, tuple | list) and len(value) == 2):
                fail(name, "a pair (low, high) with 2 <= low <= high")
            low, high = value
            if not 2 <= low <= high:
                fail(name, "a pair (low, high) with 2 <= low <= high")
        if self.cloud_len[1] + self.device_len[1] >= self.num_items:
            fail("num_items", "more items than the longest sequence (users never repeat items)")


@dataclasses.dataclass
class Fleet:
    """Raw synthetic sequences plus the hidden truth behind them (for analysis and tests)."""

    sequences: list[np.ndarray]  # per user, chronological item ids in 1..num_items
    cloud_len: np.ndarray  # [U] device period starts here
    val_start: np.ndarray  # [U]
    style: np.ndarray  # [U, T] style at each position (T = longest sequence; -1 past the end)
    num_items: int
    item_category: np.ndarray  # [I] category of item id i + 1
    item_vec: np.ndarray  # [I, k] latent of item id i + 1
    log_pop: np.ndarray  # [I]
    styles: np.ndarray  # [S, k, k]
    preference: np.ndarray  # [U, k] cloud period
    device_pref: np.ndarray  # [U, k] device period

    @property
    def cloud_style(self) -> np.ndarray:
        """[U] style at each user's last cloud-period interaction."""
        return self.style[np.arange(len(self.cloud_len)), self.cloud_len - 1]

    @property
    def device_style(self) -> np.ndarray:
        """[U] style at each device's first device-period interaction."""
        return self.style[np.arange(len(self.cloud_len)), self.cloud_len]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate_fleet(config: SyntheticConfig, seed: int) -> Fleet:
    """Sample every user's chronological sequence; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n_users, n_items, k, n_styles = (
        config.num_users,
        config.num_items,
        config.num_categories,
        config.num_styles,
    )
    item_category = rng.integers(0, k, size=n_items)
    # Noise of expected norm item_noise around the category's unit vector.
    noise = config.item_noise / np.sqrt(k) * rng.normal(size=(n_items, k))
    item_vec = _unit(np.eye(k)[item_category] + noise)
    pop_rank = rng.permutation(n_items) + 1
    log_pop = -config.popularity_exponent * np.log(pop_rank)
    log_pop -= log_pop.max()
    styles = np.stack([np.eye(k)] + [np.eye(k)[rng.permutation(k)] for _ in range(n_styles - 1)])

    preference = _unit(rng.normal(size=(n_users, k)))
    turned = _unit(rng.normal(size=(n_users, k)))
    device_pref = _unit(
        (1 - config.preference_drift) * preference + config.preference_drift * turned
    )
    cloud_len = rng.integers(config.cloud_len[0], config.cloud_len[1] + 1, size=n_users)
    device_len = rng.integers(config.device_len[0], config.device_len[1] + 1, size=n_users)
    lengths = cloud_len + device_len
    max_len = int(lengths.max())

    # Style path: start mainstream; switch at rate drift_rate, and with probability drift
    # exactly at the device-period boundary. A switch moves to a different style.
    times = np.arange(max_len)[None, :]
    switch = (rng.random((n_users, max_len)) < config.drift_rate) & (times > 0)
    at_boundary = times == cloud_len[:, None]
    switch = np.where(at_boundary, (rng.random(n_users) < config.drift)[:, None], switch)
    if n_styles == 1:
        switch[:] = False
    shifts = np.where(switch, rng.integers(1, max(n_styles, 2), size=(n_users, max_len)), 0)
    style = np.cumsum(shifts, axis=1) % n_styles
    style = np.where(times < lengths[:, None], style, -1)

    seqs = np.zeros((n_users, max_len), np.int64)  # 0-based item index while generating
    touched = np.zeros((n_users, n_items), bool)
    rows = np.arange(n_users)
    prev = None
    for t in range(max_len):
        in_device = t >= cloud_len
        pref = np.where(in_device[:, None], device_pref, preference)
        query = config.preference_strength * pref
        if prev is not None:
            moved = np.einsum("uij,uj->ui", styles[np.maximum(style[:, t], 0)], item_vec[prev])
            query = query + config.transition_strength * moved
        logits = query @ item_vec.T + config.popularity_strength * log_pop
        gumbel = -np.log(-np.log(rng.random((n_users, n_items)) + 1e-20) + 1e-20)
        scores = np.where(touched, -np.inf, logits + gumbel)
        prev = scores.argmax(axis=1)
        seqs[:, t] = prev
        touched[rows, prev] = True

    sequences = [seqs[u, : lengths[u]] + 1 for u in range(n_users)]
    val_len = np.maximum(1, np.round(config.val_frac * cloud_len)).astype(np.int64)
    return Fleet(
        sequences=sequences,
        cloud_len=cloud_len,
        val_start=cloud_len - val_len,
        style=style,
        num_items=n_items,
        item_category=item_category,
        item_vec=item_vec,
        log_pop=log_pop,
        styles=styles,
        preference=preference,
        device_pref=device_pref,
    )


def build_synthetic(config: SyntheticConfig, samples: SampleConfig, seed: int) -> Splits:
    """The synthetic fleet as train/val/test samples; device-test = each device period.
    The splits keep the full sequences, so :func:`duet_jax.data.samples.with_trigger` can
    rebuild device-test triggers (``"once"``: each device's cloud period, its items before
    ``cloud_len``)."""
    fleet = generate_fleet(config, seed)
    return build_samples(
        fleet.sequences, fleet.val_start, fleet.cloud_len, fleet.num_items, samples, seed + 1
    )
