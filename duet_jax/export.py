"""The generator as a ``jax.export`` artefact: served without the model's Python code.

    python -m duet_jax.export --checkpoint=runs/synthetic/duet --out=exported/duet
    python -m experiments.serve --exported=exported/duet

One directory holds:

- ``manifest.json``: ``export_format`` (this layout's version, :data:`EXPORT_FORMAT`), the
  model ``version`` (the same ``<method>-<digest>`` the checkpoint server reports), sizes
  (``seq_len``, ``num_items``, ``z_dim``), the head ``layout``, the jax version that wrote
  it and each function's StableHLO ``calling_convention_version``;
- ``params.npz``: the parameters, flat, in tree order (``p0``, ``p1``, ...);
- ``<upload>_<format>.jaxexport``: one serialized :class:`jax.export.Exported` per (upload,
  delivery format): ``f(*params, x [b, L] int32 | [b, Z] float32) -> payload leaves``, the
  batch dimension ``b`` symbolic, so one artefact serves every batch size.

Versioning: the model version is the parameters' digest (recomputed from ``params.npz`` at
load, so a damaged file is refused). The artefact format is :data:`EXPORT_FORMAT`; a reader
refuses another. The serialized functions follow jax's own compatibility promise for
``jax.export`` (a newer jax loads artefacts written up to about 6 months earlier; an older
jax loads newer ones only within about a month): ``manifest.json`` records the writer's
jax version and calling convention so an incompatible loader says which it met.

A symbolic batch cannot pick :func:`duet_jax.generator.affine`'s folded-bias form (chosen
by device count), so the exported decoders use the plain ``z @ kernel + bias`` at every
size: the same sum in another float order (float32 rounding apart from the checkpoint
server's heads at batches of 64 and more, identical below).
"""

from __future__ import annotations

import json
import os
import sys
import threading

import jax
import numpy as np

from duet_jax import cache, delivery, files
from duet_jax.bucketed_engine import BucketedEngine
from duet_jax.cloud import UPLOADS
from duet_jax.errors import ConfigError
from duet_jax.xla_options import CPU_VECTOR_WIDTH, generation_jit

EXPORT_FORMAT = 1
MANIFEST = "manifest.json"
PARAMS = "params.npz"


def _fn_file(kind: str, fmt: str) -> str:
    return f"{kind}_{fmt}.jaxexport"


def export_run(run, directory: str, uploads: tuple[str, ...] = UPLOADS,
               formats: tuple[str, ...] = delivery.FORMATS) -> dict:
    """Write ``run`` (:class:`duet_jax.serving.engine.LoadedRun`) to ``directory``;
    -> the manifest."""
    from duet_jax.serving.engine import Engine, Layout

    # the parameters alone ({"params": ...}: no per-item tables), so the artefact holds
    # exactly the checkpoint's parameters and its version is their digest
    engine = Engine(run, max_batch=1, uploads=uploads, formats=formats, prepare=False)
    flat, treedef = jax.tree.flatten(run.params)
    param_specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in flat]
    (b,) = jax.export.symbolic_shape("b")
    cfg = run.duet.model.config
    x_specs = {"ids": jax.ShapeDtypeStruct((b, cfg.seq_len), np.int32),
               "z": jax.ShapeDtypeStruct((b, run.duet.generator.z_dim), np.float32)}
    os.makedirs(directory, exist_ok=True)
    functions = {}
    for (kind, fmt), traced in engine.functions.items():
        def fn(*args, traced=traced):
            params = jax.tree.unflatten(treedef, args[:-1])
            return jax.tree.leaves(traced({"params": params}, args[-1]))

        exported = jax.export.export(jax.jit(fn))(*param_specs, x_specs[kind])
        name = _fn_file(kind, fmt)
        with files.atomic_file(os.path.join(directory, name), "wb") as f:
            f.write(exported.serialize())
        functions[f"{kind}:{fmt}"] = {
            "file": name, "calling_convention_version": exported.calling_convention_version,
            "outputs": len(exported.out_avals)}
    with files.atomic_file(os.path.join(directory, PARAMS), "wb") as f:
        np.savez(f, **{f"p{i}": np.asarray(x) for i, x in enumerate(flat)})
    manifest = {
        "export_format": EXPORT_FORMAT, "version": run.version, "method": run.method,
        "step": run.step, "model": run.duet.model.name, "seq_len": cfg.seq_len,
        "num_items": cfg.num_items, "z_dim": run.duet.generator.z_dim,
        "layout": Layout.of(run.duet.spec).to_json(), "num_params": len(flat),
        "jax_version": jax.__version__, "functions": functions,
    }
    files.write_text_atomic(os.path.join(directory, MANIFEST), files.dumps(manifest))
    return manifest


class ExportedEngine(BucketedEngine):
    """:class:`duet_jax.serving.engine.Engine`'s interface over an exported directory: no
    model code, only the serialized functions and the parameters."""

    def __init__(self, directory: str, max_batch: int = 64, min_bucket: int = 1,
                 uploads: tuple[str, ...] = UPLOADS,
                 formats: tuple[str, ...] = delivery.FORMATS,
                 vector_width: int = CPU_VECTOR_WIDTH):
        from duet_jax.serving.engine import Layout

        def fail(expected: str) -> ConfigError:
            return ConfigError("--exported", directory, expected)

        manifest = cache.read_json(os.path.join(directory, MANIFEST))
        if manifest is None:
            raise fail(f"a directory written by python -m duet_jax.export (no {MANIFEST})")
        if manifest.get("export_format") != EXPORT_FORMAT:
            raise fail(f"export_format {EXPORT_FORMAT}, found "
                       f"{manifest.get('export_format')!r}: export the checkpoint again")
        try:
            with np.load(os.path.join(directory, PARAMS)) as npz:
                self.params = [npz[f"p{i}"] for i in range(manifest["num_params"])]
        except (OSError, KeyError, ValueError) as err:
            raise fail(f"a readable {PARAMS} ({type(err).__name__}: {err})") from None
        version = f"{manifest['method']}-{cache.arrays_digest(self.params)[:16]}"
        if version != manifest["version"]:
            raise fail(f"parameters of version {manifest['version']}; {PARAMS} hashes to "
                       f"{version} (a damaged or replaced file)")
        self.version, self.manifest = version, manifest
        self.seq_len, self.num_items = manifest["seq_len"], manifest["num_items"]
        self.z_dim = manifest["z_dim"]
        layout = manifest["layout"]
        self.layout = Layout(tuple(e["path"] for e in layout),
                             tuple(tuple(e["shape"]) for e in layout),
                             tuple(e["dtype"] for e in layout))
        self.max_batch, self.min_bucket = max_batch, min_bucket
        self.uploads, self.formats = tuple(uploads), tuple(formats)
        self._fns = {}
        for kind in self.uploads:
            for fmt in self.formats:
                entry = manifest["functions"].get(f"{kind}:{fmt}")
                if entry is None:
                    raise fail(f"a function for {kind}:{fmt}; it has "
                               f"{sorted(manifest['functions'])}")
                with open(os.path.join(directory, entry["file"]), "rb") as f:
                    data = bytearray(f.read())
                try:
                    exported = jax.export.deserialize(data)
                except Exception as err:  # a newer calling convention, a damaged file
                    raise fail(f"{entry['file']} loadable by jax {jax.__version__} (written "
                               f"by jax {manifest['jax_version']}, calling convention "
                               f"{entry['calling_convention_version']}): {err}") from None
                self._fns[kind, fmt] = generation_jit(exported.call, vector_width)
        self.params = jax.device_put(self.params)
        self._lock = threading.Lock()

    def run(self, kind: str, fmt: str, x: np.ndarray) -> tuple[list, float]:
        out, n, seconds = self._call(kind, fmt, x, *self.params)
        out = [np.asarray(o)[:n] for o in out]
        if fmt == "int8":  # leaves of {"q", "scale"} dicts flatten as q, scale
            return [(out[i], out[i + 1]) for i in range(0, len(out), 2)], seconds
        return out, seconds


def main(argv: list[str] | None = None) -> None:
    """``python -m duet_jax.export --checkpoint=DIR --out=DIR``."""
    import argparse

    from duet_jax.serving.engine import load_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="DUET run directory")
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args(argv)
    try:
        manifest = export_run(load_run(args.checkpoint), args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: manifest[k] for k in ("version", "export_format", "jax_version")}))


if __name__ == "__main__":
    main()
