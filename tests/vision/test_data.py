"""The image fleet: deterministic per seed, disjoint source pools, a real shift (Base loses
accuracy from validation to device-test), and the TFDS path on a tiny local dataset."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from duet_jax.errors import ConfigError, DataError
from duet_jax.vision import data as data_lib
from experiments import vision
from experiments.configs import digits

SMALL = data_lib.FleetConfig(num_devices=5, train_per_device=8, val_per_device=4,
                             recent_per_device=4, test_per_device=6)


def test_deterministic_per_seed_and_seed_matters():
    a, b = data_lib.build_fleet(SMALL), data_lib.build_fleet(SMALL)
    c = data_lib.build_fleet(dataclasses.replace(SMALL, seed=1))
    for split in data_lib.SPLITS:
        np.testing.assert_array_equal(a.images[split], b.images[split])
        np.testing.assert_array_equal(a.labels[split], b.labels[split])
        assert a.images[split].shape[:2] == a.labels[split].shape
        assert a.images[split].dtype == np.float32
        assert 0.0 <= a.images[split].min() and a.images[split].max() <= 1.0
    assert not np.array_equal(a.images["train"], c.images["train"])
    assert a.image_shape == (8, 8, 1) and a.num_classes == 10


def test_device_period_drifts_in_style_and_prior():
    fleet = data_lib.build_fleet(SMALL)
    shift = np.abs(fleet.styles["device"] - fleet.styles["cloud"])
    # every device's rotation moves by at least half the configured drift
    assert (shift[:, 0] >= SMALL.rotation_drift_deg / 2).all()
    assert fleet.stats()["mean_prior_total_variation"] > 0.1
    still = data_lib.build_fleet(dataclasses.replace(
        SMALL, rotation_drift_deg=0, shear_drift=0, thickness_drift=0, contrast_drift=0,
        background_drift=0, prior_drift=0))
    np.testing.assert_array_equal(still.styles["device"][:, :4], still.styles["cloud"][:, :4])
    np.testing.assert_array_equal(still.priors["device"], still.priors["cloud"])


def test_bad_fields_name_themselves():
    with pytest.raises(ConfigError, match=r"config\.data\.prior_drift"):
        data_lib.FleetConfig(prior_drift=2.0)
    with pytest.raises(ConfigError, match=r"config\.data\.source"):
        data_lib.FleetConfig(source="imagenet")
    with pytest.raises(ConfigError, match=r"config\.data\.tfds_dir"):
        data_lib.build_fleet(data_lib.FleetConfig(source="tfds"))


def test_base_accuracy_drops_from_validation_to_device_test():
    # A smaller digits job, Base only. Measured at seed 0 (2-core AMD EPYC, CPU): validation
    # 0.7734, device-test 0.2930 (the full job, 3 seeds: 0.890 -> 0.397). The drop asserted
    # (>= 0.10) is far beyond sampling noise: 512 test images give a standard error of the
    # accuracy of about 0.02.
    config = digits.get_config()
    config.methods = "base"
    config.data.num_devices = 16
    config.train.steps = 300
    config.train.eval_every = 100
    row = {r["method"]: r for r in vision.run(config)["rows"]}["base"]
    print(f"base: validation {row['val_accuracy']:.4f}, device-test {row['test_accuracy']:.4f}")
    assert row["val_accuracy"] > 0.6  # it learned digits
    assert row["val_accuracy"] - row["test_accuracy"] >= 0.10, row


class FakeImages(tfds.core.GeneratorBasedBuilder):
    """A tiny MNIST-shaped dataset written locally (no download), array_record."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(12, 12, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(60):
            image = np.zeros((12, 12, 1), np.uint8)
            image[2 + i % 3 * 3:5 + i % 3 * 3, 3:9] = rng.integers(128, 256)  # class = bar row
            yield i, {"image": image, "label": i % 3}


def test_tfds_source_builds_a_fleet(tmp_path):
    data_dir = str(tmp_path)
    FakeImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    images, labels = data_lib.load_tfds_source("fake_images", data_dir, "train", 30, False)
    assert images.shape == (30, 12, 12, 1) and images.max() <= 1.0
    # TFDS shuffles the records; each label must still match its image (the bar's row)
    np.testing.assert_array_equal(labels, (images[..., 0].sum(2).argmax(1) - 2) // 3)
    assert set(labels.tolist()) == {0, 1, 2}
    config = dataclasses.replace(SMALL, source="tfds", tfds_name="fake_images",
                                 tfds_dir=data_dir, tfds_max_examples=60, image_size=8)
    fleet = data_lib.build_fleet(config)
    assert fleet.image_shape == (8, 8, 1) and fleet.num_classes == 3
    again = data_lib.build_fleet(config)
    np.testing.assert_array_equal(fleet.images["test"], again.images["test"])
    with pytest.raises(DataError, match="not prepared"):
        data_lib.load_tfds_source("fake_images", str(tmp_path / "empty"), "train", 10, False)
