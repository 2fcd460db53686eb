"""What the server runs: a trained DUET loaded from its run directory, and batched, jitted
generation per (upload kind, delivery format, batch bucket).

A run directory is what training writes for one method (``WORKDIR/<method>``):
``run_config.json`` (the run's identity: model, sizes, generator options) and
``checkpoints/<step>/`` (orbax). The server serves the *kept* (best-on-validation)
parameters. Their version is ``<method>-<sha256 of the parameters, 16 hex>``, so a restarted
server, or another replica of the same run, answers with the same version.

An :class:`Engine` answers ``run(kind, fmt, x)`` for ``x [n, L]`` int32 ids or ``[n, Z]``
float32 z: the delivery payload leaves (:mod:`duet_jax.delivery`), numpy, each ``[n, ...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from duet_jax import cache, delivery
from duet_jax.bucketed_engine import BucketedEngine, buckets  # noqa: F401  (re-exported)
from duet_jax.cloud import UPLOADS
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.lowrank import materialize
from duet_jax.paramspec import HeadSpec
from duet_jax.xla_options import CPU_VECTOR_WIDTH, generation_jit

RUN_CONFIG = "run_config.json"
RUN_CONFIG_FORMAT = 2  # the run_config.json layout this loader reads (duet_jax.training)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a device needs to rebuild its head from the payload's leaves, in order."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, spec: HeadSpec) -> Layout:
        return cls(spec.paths, spec.shapes, tuple(str(np.dtype(d)) for d in spec.dtypes))

    def to_json(self) -> list[dict]:
        return [{"path": p, "shape": list(s), "dtype": d}
                for p, s, d in zip(self.paths, self.shapes, self.dtypes, strict=True)]


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained DUET restored from a run directory."""

    duet: Duet
    params: dict  # {"backbone", "generator"}: the kept parameters
    method: str
    step: int  # the checkpoint's optimiser step
    version: str
    run_dir: str


def _fail(path: str, expected: str) -> ConfigError:
    return ConfigError("--checkpoint", path, expected)


def _run_dir(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.basename(path.rstrip(os.sep)) == "checkpoints":
        return os.path.dirname(path)
    return path


def params_version(method: str, params: Any) -> str:
    """``<method>-<16 hex>``: the same parameters always give the same version."""
    return f"{method}-{cache.arrays_digest(params)[:16]}"


def _model_config(cfg: dict, num_items: int):
    from duet_jax.models import ModelConfig

    sasrec, din = cfg.get("sasrec") or {}, cfg.get("din") or {}
    kwargs = {"num_items": num_items, "seq_len": cfg.get("seq_len"),
              "embed_dim": cfg.get("embed_dim")}
    for key, source in (("num_heads", sasrec), ("ffn_mult", sasrec), ("mask_padding", sasrec)):
        if key in source:
            kwargs[key] = source[key]
    if "hidden" in din:
        kwargs["din_hidden"] = tuple(din["hidden"])
    return ModelConfig(**{k: v for k, v in kwargs.items() if v is not None})


def _shapes(metadata: Any) -> dict:
    """``best_params`` of a checkpoint's ``state`` metadata as a tree of shapes."""
    return jax.tree.map(lambda x: tuple(x.shape), metadata["best_params"],
                        is_leaf=lambda x: hasattr(x, "shape"))


def load_run(path: str, step: int | None = None) -> LoadedRun:
    """Restore the kept parameters of the DUET run in ``path`` (``WORKDIR/<method>`` or its
    ``checkpoints/``); a missing, corrupt or incompatible run raises :class:`ConfigError`
    naming what is wrong."""
    from duet_jax.checkpoint import Checkpointer
    from duet_jax.methods import method_spec
    from duet_jax.models import get_model
    from duet_jax.training import TrainState

    run_dir = _run_dir(path)
    identity = cache.read_json(os.path.join(run_dir, RUN_CONFIG))
    if identity is None:
        raise _fail(path, f"a training run directory (WORKDIR/<method>) holding {RUN_CONFIG} "
                          "and checkpoints/; no readable run_config.json there")
    if identity.get("format") != RUN_CONFIG_FORMAT:
        raise _fail(path, f"a run_config.json of format {RUN_CONFIG_FORMAT}, "
                          f"found {identity.get('format')!r}")
    method, cfg = identity.get("method"), identity.get("config") or {}
    try:
        uses_generator = method_spec(str(method)).uses_generator
    except (KeyError, ValueError):
        uses_generator = False
    if not uses_generator:
        raise _fail(path, f"the run of a DUET method (one with a generator); this run is "
                          f"method {method!r}")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise _fail(path, "a run with checkpoints/; there is none")
    with Checkpointer(ckpt_dir) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise _fail(path, "a run with at least one complete checkpoint; found none")
        try:
            shapes = _shapes(ckpt.state_metadata(step))
        except Exception as err:  # orbax raises many types for a damaged step
            raise _fail(path, f"a readable checkpoint at step {step} "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
        try:
            num_items = shapes["backbone"]["item_embedding"][0] - 1
            model = get_model(str(cfg.get("model")), _model_config(cfg, num_items))
            options = {k: v for k, v in (cfg.get("generator") or {}).items() if k != "training"}
            duet = Duet.create(model, **options)
        except (KeyError, TypeError, ValueError, FileNotFoundError, OSError) as err:
            raise _fail(path, f"a readable DUET checkpoint at step {step} matching its "
                              f"run_config.json ({type(err).__name__}: {err})") from None
        abstract = jax.eval_shape(duet.init, jax.random.key(0))
        want = jax.tree.map(lambda x: tuple(x.shape), abstract)
        if jax.tree.structure(want) != jax.tree.structure(shapes) or want != shapes:
            diff = [f"{'/'.join(map(str, k))}: checkpoint {a} vs model {b}"
                    for (k, a), (_, b) in zip(_flat(shapes), _flat(want), strict=False)
                    if a != b][:3]
            raise _fail(path, "parameters shaped as its run_config.json describes; "
                              f"they differ ({'; '.join(diff) or 'tree structure'})")
        target = {"train": TrainState(step=jnp.zeros((), jnp.int32), params=abstract,
                                      opt_state=jax.eval_shape(optax.adam(1e-3).init, abstract)),
                  "best_params": abstract}
        target = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), target)
        try:
            restored, _ = ckpt.restore(target, step)
        except Exception as err:  # orbax raises many types for a damaged step
            raise _fail(path, f"a readable checkpoint at step {step} "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
    params = jax.tree.map(np.asarray, restored["best_params"])
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
        raise _fail(path, f"finite parameters; step {step} holds NaN or inf")
    return LoadedRun(duet, params, str(method), int(step), params_version(str(method), params),
                     run_dir)


def _flat(tree: Any) -> list:
    return [(tuple(getattr(k, "key", k) for k in path), v)
            for path, v in jax.tree_util.tree_flatten_with_path(
                tree, is_leaf=lambda x: isinstance(x, tuple))[0]]


def payload_leaves(spec: HeadSpec, payload: Any, fmt: str) -> list:
    """A delivery payload as a flat list in leaf order: arrays (float32, bfloat16) or
    ``(q, scale)`` pairs (int8)."""
    parts = spec.treedef.flatten_up_to(payload)
    if fmt == "int8":
        return [(p["q"], p["scale"]) for p in parts]
    return list(parts)


class Engine(BucketedEngine):
    """Batched generation for one trained DUET: ``run(kind, fmt, x)`` -> payload leaves.

    Rows are padded (repeating row 0) to a power-of-two bucket in ``[min_bucket,
    max_batch]``, so jit compiles one program per (kind, fmt, bucket). Calls are serialised
    by a lock: one generation at a time uses all cores. ``vector_width``: on CPU, LLVM's
    preferred vector width for generation (:mod:`duet_jax.xla_options`; 0 = XLA's default).
    """

    def __init__(self, run: LoadedRun, max_batch: int = 64, min_bucket: int = 1,
                 uploads: tuple[str, ...] = UPLOADS,
                 formats: tuple[str, ...] = delivery.FORMATS, prepare: bool = True,
                 vector_width: int = CPU_VECTOR_WIDTH):
        self.run_info, self.duet = run, run.duet
        self.spec = run.duet.spec
        self.version, self.layout = run.version, Layout.of(self.spec)
        cfg = run.duet.model.config
        self.seq_len, self.num_items = cfg.seq_len, cfg.num_items
        self.z_dim = run.duet.generator.z_dim
        self.max_batch, self.min_bucket = max_batch, min_bucket
        self.uploads, self.formats = tuple(uploads), tuple(formats)
        # prepare: generation reads per-item tables (Duet.prepare) made once per loaded
        # checkpoint; without, the functions take the parameters alone (what export needs)
        self.inputs = jax.device_put(
            jax.jit(run.duet.prepare)(run.params) if prepare else {"params": run.params})
        # the traceable functions (jax.export wraps them in its own jit) and their jits
        self.functions = {(k, f): self._build(k, f) for k in self.uploads for f in self.formats}
        self._fns = {key: generation_jit(fn, vector_width)
                     for key, fn in self.functions.items()}
        self._lock = threading.Lock()

    def _build(self, kind: str, fmt: str):
        duet, spec, gen = self.duet, self.spec, self.duet.generator

        def fn(prepared, x):
            if kind == "ids":
                heads = duet.generate_prepared(prepared, x)
            else:
                heads = gen.apply(prepared["params"]["generator"], x, method=gen.decode)
            return delivery.encode(spec, materialize(heads), fmt)

        return fn

    def run(self, kind: str, fmt: str, x: np.ndarray) -> tuple[list, float]:
        """``x [n, ...]`` (n <= max_batch) -> (payload leaves, numpy ``[n, ...]``; seconds of
        the jitted call, host transfer included)."""
        out, n, seconds = self._call(kind, fmt, x, self.inputs)
        leaves = payload_leaves(self.spec, out, fmt)
        cut = functools.partial(_cut, n=n)
        return [jax.tree.map(cut, leaf) for leaf in leaves], seconds


def _cut(x: jax.Array, n: int) -> np.ndarray:
    return np.asarray(x)[:n]
