"""The vision head as a benchmark case: DUET writing MobileNet classifier heads for N devices
from each device's set of recent unlabelled images (backbone features of the set, the set
encoder, the decoders), in batches of B devices; devices/s and ms per device.

To run it from ``python -m experiments.benchmark``, :func:`experiments.benchmark.cases.tasks`
adds ``vision_case.tasks(bench)`` to its list when the case group ``vision`` is asked for
(``--config.cases=...,vision``). The sizes are the digits job's
(``experiments/configs/digits.py``): 8x8 images, sets of its ``set_size``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.vision import methods
from duet_jax.vision.model import vision_model
from experiments.configs import digits


def _setup(seed: int):
    train = methods.VisionTrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in digits.get_config().train.to_dict().items()})
    model = vision_model()
    method = methods.duet_method(model, train)
    gen = methods.duet_generator(model, train)
    params = method.init(jax.random.key(seed))
    return model, gen, params, train.set_size


def generate_heads(model, gen, params, sets):
    """Heads for a batch of devices' sets ``[B, K, 8, 8, 1]`` (all valid)."""
    return methods.generate_heads(model, gen, params, sets, jnp.ones(sets.shape[:2], bool))


def vision_generation(bench, n: int, batch: int) -> dict:
    """``n`` vision heads from ``jit(generate)`` in batches of ``batch`` (the last padded)."""
    model, gen, params, k = _setup(bench.config.seed)
    calls = -(-n // batch)
    rng = np.random.default_rng(bench.config.seed)
    images = rng.random((batch, k, 8, 8, 1), dtype=np.float32)  # cost does not depend on pixels
    sets = [jax.device_put(images)] * calls
    fn = functools.partial(generate_heads, model, gen)
    measured = bench.time(fn, [(params, s) for s in sets], (params, sets[0]))
    return bench.case("vision_generation", "mobilenet", n, batch, measured, batch_size=batch,
                      set_size=k, padded_devices=calls * batch,
                      generated_values_per_device=gen.spec.num_values,
                      heads="streamed: each batch's heads discarded once computed")


def tasks(bench) -> list:
    """The vision cases as ``(label, thunk)``: generation at the config's first N (capped at
    65,536: a set is 64 images per device) and batch size."""
    n = min(bench.config.num_devices[0], 65_536)
    b = bench.config.batch_size
    return [(f"mobilenet generate N={n} B={b}", lambda: [vision_generation(bench, n, b)])]
