"""Fleet outputs: ``fleet.json``, ``fleet.md`` and two PNG plots, written atomically."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from duet_jax import files
from experiments.report import environment

PLOTS = ("fleet_auc_rounds.png", "fleet_bytes_auc.png")


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(payload: dict) -> str:
    """The summary table: one row per (policy, format), Base last; then uploads."""
    rows = payload["totals"]
    base = next((r for r in rows if r["policy"] == "base"), None)
    f = payload["fleet"]
    lines = [
        f"Fleet: {f['devices']} devices, {f['rounds']} rounds, {f['samples']} samples "
        f"({f['events']} interactions); head = {f['head_values']} values in "
        f"{f['head_leaves']} leaves; {f['jax_devices']} JAX device(s)"
        f"{', sharded' if f['sharded'] else ''}.",
        "",
        "| policy | format | requests/device | bytes up/device | bytes down/device | "
        "cloud ms | cloud µs/request | staleness | auc | uauc | Δauc vs base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r["auc"] - base["auc"] if base and r is not base else None
        lines.append(
            f"| {r['policy']} | {r['format']} | {r['requests_per_device']:.2f} | "
            f"{r['bytes_up_per_device']:,.0f} | {r['bytes_down_per_device']:,.0f} | "
            f"{1e3 * r['cloud_seconds']:.1f} | {_num(r['cloud_us_per_request'], 2)} | "
            f"{_num(r['mean_staleness'], 2)} | {r['auc']:.4f} | {r['uauc']:.4f} | "
            f"{'–' if delta is None else f'{delta:+.4f}'} |"
        )
    lines += [
        "",
        "| upload | bytes up/request | cloud µs/request | requests/s | max abs head diff vs ids |",
        "|---|---|---|---|---|",
    ]
    for u in payload["uploads"]:
        rate = u["requests_per_second"]
        lines.append(
            f"| {u['upload']} | {u['bytes_up_per_request']:.1f} | "
            f"{u['cloud_us_per_request']:.2f} | {'–' if rate is None else f'{rate:,.0f}'} | "
            f"{u['max_abs_head_diff_vs_ids']:.2e} |"
        )
    ft = payload.get("finetune")
    if ft:
        per_step = ", ".join(f"{k} steps {1e3 * v:.3f} ms" for k, v in
                             ft["seconds_per_device"].items())
        ft_line = (f"On-device fine-tuning instead ({ft['devices']} devices, {ft['params']} "
                   f"parameters, {ft['rows_per_device']} rows each, Adam "
                   f"{ft['learning_rate']:g}, vmapped groups of {ft['group_size']}), per "
                   f"device: {per_step}.")
    else:
        ft_line = "On-device fine-tuning: not measured (no Base: config.fleet.base=False)."
    lines += [
        "",
        ft_line,
        f"Job time: {payload['seconds']['total']:.1f} s (training {payload['seconds']['train']:.1f}"
        f" s, simulation {payload['seconds']['simulation']:.1f} s).",
    ]
    return "\n".join(lines) + "\n"


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    with files.atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def plot_auc_rounds(payload: dict, path: str) -> None:
    """AUC of the fleet per round, one line per policy (float32 delivery, or the first
    format), Base dashed."""
    records = payload["records"]
    formats = [fmt for fmt in dict.fromkeys(r["format"] for r in records) if fmt != "static"]
    fmt = "float32" if "float32" in formats else formats[0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for policy in dict.fromkeys(r["policy"] for r in records):
        rec = [r for r in records if r["policy"] == policy and r["format"] in (fmt, "static")]
        xs = [r["round"] for r in rec if r["auc"] is not None]
        ys = [r["auc"] for r in rec if r["auc"] is not None]
        style = "--" if policy == "base" else "-"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=policy)
    ax.set_xlabel("round")
    ax.set_ylabel("AUC of the round's samples")
    ax.set_title(f"Fleet AUC over rounds ({fmt} delivery)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_bytes_auc(payload: dict, path: str) -> None:
    """Bytes down per device against AUC: one point per (policy, format)."""
    markers = {"float32": "o", "bfloat16": "s", "int8": "^"}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    policies = [p for p in dict.fromkeys(r["policy"] for r in payload["totals"]) if p != "base"]
    colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in payload["totals"]:
        if r["policy"] == "base":
            ax.axhline(r["auc"], color="grey", linestyle="--", label="base (0 bytes)")
            continue
        ax.scatter(r["bytes_down_per_device"] / 1024, r["auc"], color=colors[r["policy"]],
                   marker=markers.get(r["format"], "o"), label=f"{r['policy']} / {r['format']}")
    ax.set_xlabel("KiB down per device (whole simulation)")
    ax.set_ylabel("AUC (all rounds)")
    ax.set_title("Traffic vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def write(workdir: str, payload: dict) -> None:
    """fleet.json (with the machine and versions), fleet.md and the plots."""
    payload = {**payload, "environment": environment()}
    files.write_text_atomic(os.path.join(workdir, "fleet.json"), files.dumps(payload))
    files.write_text_atomic(os.path.join(workdir, "fleet.md"), markdown(payload))
    plot_auc_rounds(payload, os.path.join(workdir, PLOTS[0]))
    plot_bytes_auc(payload, os.path.join(workdir, PLOTS[1]))
