"""The image-classification task: a MobileNet-style device model, a device fleet of shifted
handwritten digits (or a TFDS image dataset), and the Base / fine-tuning / DUET comparison.

Importing this package registers the model as ``"mobilenet"`` (default sizes, 8x8 digits)
in :mod:`duet_jax.models`; :func:`vision_model` builds it at other sizes.
"""

from duet_jax.models import MODELS, register_model
from duet_jax.vision.model import MobileNet, VisionConfig, vision_model

if "mobilenet" not in MODELS:
    register_model("mobilenet", MobileNet())

__all__ = ["MobileNet", "VisionConfig", "vision_model"]
