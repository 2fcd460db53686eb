"""Write experiment rows as results.json / results.csv / results.md (atomically)."""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import subprocess
from importlib import metadata

from duet_jax import files
from experiments import cli
from experiments.experiment import ROW_KEYS

COLUMNS = tuple(k for k in ROW_KEYS if k != "seed")  # the table; every row also has its seed
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment() -> dict:
    """Machine and library versions, so a result says where it came from."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import jax

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu": cpu_details(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": versions,
        "code": code_version(),
        "malloc_keep_freed": cli.malloc_setting(),
        # environment settings that change speed, never results (None: unset)
        "env": {name: os.environ.get(name) for name in ("XLA_FLAGS", "GLIBC_TUNABLES")},
    }


def code_version(root: str = ROOT) -> dict:
    """The git commit the code ran at, whether tracked files differed from it and which
    (``dirty_paths``: so a reader can tell edited code from uncommitted result files);
    ``None`` values outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        # not stripped: a porcelain line starts with a meaningful space (" M path")
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    commit = commit.strip() if commit else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    if status is None:
        return {"commit": commit, "dirty": None, "dirty_paths": None}
    # porcelain v1: two status letters, a space, then the path ("old -> new" for renames)
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(paths), "dirty_paths": paths}


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
              "avx512_bf16", "amx_tile", "asimd", "sve")  # what XLA's CPU code may use


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor()


def cpu_details() -> dict:
    """The CPU's family/model numbers and SIMD extensions: "AMD EPYC" alone names CPUs from
    AVX2-only Zen 3 to AVX-512 Zen 5, which generate heads at different speeds."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {"vendor": info.get("vendor_id"), "family": info.get("cpu family"),
            "model": info.get("model"), "simd": [f for f in SIMD_FLAGS if f in flags]}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    by_key = {(r["model"], r["method"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        base, duet = by_key.get((model, "base")), by_key.get((model, "duet"))
        if base and duet:
            lines.append("")
            lines.append(
                f"{model}: DUET - Base = AUC {duet['auc'] - base['auc']:+.4f}, "
                f"UAUC {duet['uauc'] - base['uauc']:+.4f}, "
                f"logloss {duet['logloss'] - base['logloss']:+.4f} (lower is better)"
            )
    return "\n".join(lines) + "\n"


def write_results(workdir: str, rows: list[dict], config: dict, data_stats: dict) -> str:
    """Write the three result files (strict JSON: NaN becomes null); returns the table."""
    payload = {"rows": rows, "config": config, "data": data_stats, "environment": environment()}
    files.write_text_atomic(os.path.join(workdir, "results.json"), files.dumps(payload))
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text_atomic(os.path.join(workdir, "results.csv"), buf.getvalue())
    table = markdown_table(rows)
    files.write_text_atomic(os.path.join(workdir, "results.md"), table)
    return table
