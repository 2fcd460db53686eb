"""A device fleet of images with per-device shift: sklearn's handwritten digits (embedded,
no download) or an image dataset read through TFDS from a local ``data_dir``.

Each device is a writer: a style (rotation, shear, stroke thickness, contrast) and a label
prior. Its *cloud period* (what the cloud trained on) uses that style and prior; its
*device period* (what it sees after deployment) drifts: every style parameter moves by a
drawn amount and the prior moves towards another Dirichlet draw. Per device:

- ``train``: cloud period, labelled (cloud training);
- ``val``: cloud period, labelled (model and hyper-parameter selection);
- ``recent``: device period, the device's recent images; their labels are used only by
  on-device fine-tuning (DUET reads them unlabelled);
- ``test``: device period, evaluated once.

The source images are first split into disjoint pools (train / val / device period), so no
test image is a transformed copy of a training image. Everything is a function of
:class:`FleetConfig` (its ``seed`` included) alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.ndimage

from duet_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "recent", "test")
SOURCES = ("digits", "tfds")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """Every choice of the fleet (``config.data`` in experiment configs)."""

    source: str = "digits"  # "digits" (sklearn, embedded) | "tfds"
    tfds_name: str = "mnist"  # tfds: mnist, fashion_mnist, cifar10, emnist, ...
    tfds_dir: str = ""  # tfds: the local data_dir holding the prepared dataset
    tfds_split: str = "train"
    tfds_max_examples: int = 6000  # tfds: the first this many examples are the source pool
    image_size: int = 0  # 0 = the source's own size; else resized (bilinear) to this
    grayscale: bool = False  # convert RGB sources to one channel
    seed: int = 0
    num_devices: int = 40
    train_per_device: int = 48
    val_per_device: int = 16
    recent_per_device: int = 16
    test_per_device: int = 32
    pool_fractions: tuple[float, float, float] = (0.5, 0.2, 0.3)  # train / val / device period
    prior_alpha: float = 0.5  # Dirichlet concentration of each device's label prior
    prior_drift: float = 0.7  # device-period prior = (1 - d) prior + d (a new Dirichlet draw)
    rotation_deg: float = 15.0  # cloud style: rotation ~ U(-r, r) degrees
    rotation_drift_deg: float = 25.0  # device period: + sign * U(d / 2, d)
    shear: float = 0.2  # cloud style: shear ~ U(-s, s)
    shear_drift: float = 0.3
    thickness: float = 0.5  # cloud style: stroke thickness ~ U(-t, t) (<0 thinner, >0 thicker)
    thickness_drift: float = 0.8
    contrast: tuple[float, float] = (0.7, 1.0)  # cloud style: ink intensity ~ U(lo, hi)
    contrast_drift: float = 0.35  # device period: intensity * U(1 - d, 1 - d / 2)
    background_drift: float = 0.15  # device period: background level + U(0, b)
    jitter_deg: float = 5.0  # per-image rotation jitter around the device's style
    noise_std: float = 0.03  # per-image Gaussian pixel noise

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok:
                raise ConfigError(f"config.data.{name}", getattr(self, name), expected)

        check("source", self.source in SOURCES, f"one of {SOURCES}")
        for name in ("num_devices", "train_per_device", "val_per_device",
                     "recent_per_device", "test_per_device", "tfds_max_examples"):
            check(name, int(getattr(self, name)) >= 1, "an integer >= 1")
        check("image_size", self.image_size >= 0, "0 (source size) or a size >= 1")
        fr = self.pool_fractions
        check("pool_fractions", len(fr) == 3 and all(f > 0 for f in fr)
              and abs(sum(fr) - 1) < 1e-9, "three positive fractions summing to 1")
        check("prior_alpha", self.prior_alpha > 0, "a number > 0")
        check("prior_drift", 0 <= self.prior_drift <= 1, "a number in [0, 1]")
        lo, hi = self.contrast
        check("contrast", 0 < lo <= hi, "(lo, hi) with 0 < lo <= hi")
        check("contrast_drift", 0 <= self.contrast_drift < 1, "a number in [0, 1)")
        for name in ("rotation_deg", "rotation_drift_deg", "shear", "shear_drift", "thickness",
                     "thickness_drift", "background_drift", "jitter_deg", "noise_std"):
            check(name, getattr(self, name) >= 0, "a number >= 0")


@dataclasses.dataclass
class Fleet:
    """Per-device images ``[D, n, H, W, C]`` float32 in [0, 1] and labels ``[D, n]`` int32
    for each split in :data:`SPLITS`, plus each device's styles and priors."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    num_classes: int
    styles: dict[str, np.ndarray]  # "cloud" / "device": [D, 5] rotation, shear, thick, ink, bg
    priors: dict[str, np.ndarray]  # "cloud" / "device": [D, classes]

    @property
    def num_devices(self) -> int:
        return self.labels["train"].shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images["train"].shape[2:])

    def stats(self) -> dict:
        """Sizes and how far the device period moved (for the report)."""
        shift = np.abs(self.styles["device"] - self.styles["cloud"]).mean(0)
        tv = 0.5 * np.abs(self.priors["device"] - self.priors["cloud"]).sum(1).mean()
        return {
            "num_devices": self.num_devices, "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            **{f"{s}_per_device": int(self.labels[s].shape[1]) for s in SPLITS},
            "mean_abs_style_shift": dict(zip(
                ["rotation_deg", "shear", "thickness", "ink", "background"],
                [float(x) for x in shift], strict=True)),
            "mean_prior_total_variation": float(tv),
        }


# ------------------------------------------------------------------------- sources


def load_digits_source() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 handwritten digits: ``images [N, 8, 8, 1]`` in [0, 1], labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return images, digits.target.astype(np.int32)


def load_tfds_source(name: str, data_dir: str, split: str, max_examples: int,
                     grayscale: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_examples`` of a prepared TFDS image dataset (``image`` uint8 HWC and
    ``label`` features) from ``data_dir``, read with ``tfds.data_source`` (no download)."""
    import tensorflow_datasets as tfds

    if not data_dir:
        raise ConfigError("config.data.tfds_dir", data_dir,
                          "the local TFDS data_dir holding the prepared dataset")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {data_dir!r}: prepare it there "
                f"first (tfds build {name} --data_dir={data_dir} --file_format=array_record)")
        source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"TFDS dataset {name!r} (split {split!r}) cannot be read from "
                        f"{data_dir!r}: {err}") from err
    n = min(len(source), max_examples)
    records = source.__getitems__(list(range(n))) if hasattr(source, "__getitems__") \
        else [source[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., None]
    if grayscale and images.shape[-1] == 3:
        images = images @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    labels = np.array([int(r["label"]) for r in records], np.int32)
    return images, labels


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if size == 0 or images.shape[1] == size:
        return images
    zoom = (1, size / images.shape[1], size / images.shape[2], 1)
    return np.clip(scipy.ndimage.zoom(images, zoom, order=1), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------- transforms


def _style(rng: np.random.Generator, c: FleetConfig) -> np.ndarray:
    """A cloud-period style: rotation (deg), shear, thickness, ink, background."""
    return np.array([rng.uniform(-c.rotation_deg, c.rotation_deg),
                     rng.uniform(-c.shear, c.shear),
                     rng.uniform(-c.thickness, c.thickness),
                     rng.uniform(*c.contrast), 0.0])


def _drift(rng: np.random.Generator, style: np.ndarray, c: FleetConfig) -> np.ndarray:
    """The device-period style: each parameter moved by a drawn amount of random sign."""
    sign = lambda: rng.choice([-1.0, 1.0])
    move = lambda d: sign() * rng.uniform(d / 2, d)
    return np.array([style[0] + move(c.rotation_drift_deg),
                     style[1] + move(c.shear_drift),
                     np.clip(style[2] + move(c.thickness_drift), -1.0, 1.0),
                     style[3] * rng.uniform(1 - c.contrast_drift, 1 - c.contrast_drift / 2),
                     rng.uniform(0, c.background_drift)])


def transform(image: np.ndarray, style: np.ndarray, rng: np.random.Generator,
              c: FleetConfig) -> np.ndarray:
    """One image ``[H, W, C]`` in a writer's style (plus per-image jitter and noise)."""
    rotation, shear, thickness, ink, background = style
    angle = math.radians(rotation + rng.uniform(-c.jitter_deg, c.jitter_deg))
    cos, sin = math.cos(angle), math.sin(angle)
    # output -> input coordinates (row, col): the inverse of rotate-then-shear about the centre
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, 0.0], [shear, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = (np.array(image.shape[:2]) - 1) / 2.0
    offset = centre - inverse @ centre
    out = np.stack([scipy.ndimage.affine_transform(image[..., k], inverse, offset, order=1,
                                                   mode="constant", cval=0.0)
                    for k in range(image.shape[-1])], -1)
    if thickness != 0:  # blend towards a dilated (thicker) or eroded (thinner) stroke
        morph = scipy.ndimage.grey_dilation if thickness > 0 else scipy.ndimage.grey_erosion
        out = (1 - abs(thickness)) * out + abs(thickness) * morph(out, size=(2, 2, 1))
    out = background + (ink - background) * out + rng.normal(0, c.noise_std, out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- fleet


def build_fleet(c: FleetConfig, source: tuple[np.ndarray, np.ndarray] | None = None) -> Fleet:
    """The fleet of ``c`` (``source`` overrides where images come from: ``(images, labels)``).

    Deterministic: the same config gives bitwise the same fleet.
    """
    if source is None:
        source = load_digits_source() if c.source == "digits" else load_tfds_source(
            c.tfds_name, c.tfds_dir, c.tfds_split, c.tfds_max_examples, c.grayscale)
    images, labels = source
    images = _resize(np.asarray(images, np.float32), c.image_size)
    labels = np.asarray(labels, np.int32)
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng([c.seed, 7919])
    # disjoint pools of source images, stratified by class
    pools = [[[] for _ in range(num_classes)] for _ in range(3)]
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == k))
        if len(idx) < 3:
            raise DataError(f"class {k} has {len(idx)} source images: need at least 3")
        cuts = np.cumsum([max(1, round(f * len(idx))) for f in c.pool_fractions[:2]])
        for pool, part in zip(pools, np.split(idx, cuts), strict=True):
            pool[k] = part
    pool_of = {"train": 0, "val": 1, "recent": 2, "test": 2}
    sizes = {"train": c.train_per_device, "val": c.val_per_device,
             "recent": c.recent_per_device, "test": c.test_per_device}
    out_images = {s: np.zeros((c.num_devices, sizes[s], *images.shape[1:]), np.float32)
                  for s in SPLITS}
    out_labels = {s: np.zeros((c.num_devices, sizes[s]), np.int32) for s in SPLITS}
    styles = {"cloud": np.zeros((c.num_devices, 5)), "device": np.zeros((c.num_devices, 5))}
    priors = {"cloud": np.zeros((c.num_devices, num_classes)),
              "device": np.zeros((c.num_devices, num_classes))}
    for d in range(c.num_devices):
        cloud_style = _style(rng, c)
        styles["cloud"][d], styles["device"][d] = cloud_style, _drift(rng, cloud_style, c)
        prior = rng.dirichlet(np.full(num_classes, c.prior_alpha))
        priors["cloud"][d] = prior
        priors["device"][d] = (1 - c.prior_drift) * prior + c.prior_drift * rng.dirichlet(
            np.full(num_classes, c.prior_alpha))
        for split in SPLITS:
            period = "cloud" if split in ("train", "val") else "device"
            ys = rng.choice(num_classes, size=sizes[split], p=priors[period][d])
            for i, y in enumerate(ys):
                pool = pools[pool_of[split]][y]
                src = images[pool[rng.integers(len(pool))]]
                out_images[split][d, i] = transform(src, styles[period][d], rng, c)
            out_labels[split][d] = ys
    return Fleet(out_images, out_labels, num_classes, styles, priors)
