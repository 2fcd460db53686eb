"""The paper table from finished cells: mean ± std over seeds, the ablation, a plot.

A *cell* is one (dataset, model, seed) run; its ``rows.json`` holds one row per method
(:func:`experiments.experiment.run`). Rows are grouped by (dataset, model, method) and every
metric is summarised as mean and sample standard deviation (ddof = 1) over the seeds
present; ``n`` says how many seeds that is.
"""

from __future__ import annotations

import csv
import io
import math
import os

import numpy as np

from duet_jax import files
from duet_jax.metrics import METRIC_NAMES

MAIN_METHODS = ("base", "finetune", "duet")
ABLATION_METHODS = (
    "duet",
    "duet_frozen",
    "duet_stabiliser",
    "duet_stabiliser_rows",
    "duet_two_stage",
    "duet_low_rank",
)
ABLATION_LABELS = {
    "duet": "DUET (trained decoders, no stabiliser, joint, full rank)",
    "duet_frozen": "frozen decoders (authors' code)",
    "duet_stabiliser": "+ stabiliser, softmax over candidates (paper)",
    "duet_stabiliser_rows": "+ stabiliser, softmax over rows (authors' code)",
    "duet_two_stage": "two-stage (Base, then generator on a frozen backbone)",
    "duet_low_rank": "low-rank decoders",
}
SUMMARISED = (*METRIC_NAMES, "adapt_ms_per_device")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (dataset, model, method) with ``<metric>_mean``, ``<metric>_std``, ``n``
    and the seeds; groups keep the order in which they first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["method"]), []).append(row)
    out = []
    for (dataset, model, method), members in groups.items():
        entry = {
            "dataset": dataset,
            "model": model,
            "method": method,
            "n": len(members),
            "seeds": sorted(r["seed"] for r in members),
        }
        for key in SUMMARISED:
            values = [r[key] for r in members if r.get(key) is not None]
            values = [v for v in values if math.isfinite(v)]
            entry[f"{key}_mean"] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out.append(entry)
    return out


def _pm(entry: dict, key: str, digits: int = 4) -> str:
    mean, std = entry.get(f"{key}_mean"), entry.get(f"{key}_std")
    if mean is None:
        return "–"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ms(entry: dict) -> str:
    mean = entry.get("adapt_ms_per_device_mean")
    return "–" if mean is None else f"{mean:.4g}"


def markdown(summary: list[dict], methods: tuple[str, ...], labels: dict | None = None) -> str:
    """A table of ``summary`` entries whose method is in ``methods`` (in that order)."""
    columns = ["dataset", "model", "method", "n", *METRIC_NAMES, "adapt ms/device"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    order = {m: i for i, m in enumerate(methods)}
    keep = [e for e in summary if e["method"] in order]
    keep.sort(key=lambda e: (e["dataset"], e["model"], order[e["method"]]))
    for e in keep:
        name = (labels or {}).get(e["method"], e["method"])
        cells = [e["dataset"], e["model"], name, str(e["n"])]
        cells += [_pm(e, k) for k in METRIC_NAMES] + [_ms(e)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_auc(summary: list[dict], path: str) -> None:
    """Bar chart of test AUC (mean ± std over seeds): one panel per model, datasets on the
    x axis, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [e for e in summary if e["method"] in MAIN_METHODS and e["auc_mean"] is not None]
    if not main:
        return
    models = list(dict.fromkeys(e["model"] for e in main))
    datasets = list(dict.fromkeys(e["dataset"] for e in main))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.9), squeeze=False,
                             sharey=True)
    width = 0.8 / len(MAIN_METHODS)
    for ax, model in zip(axes[0], models, strict=True):
        for i, method in enumerate(MAIN_METHODS):
            by_data = {e["dataset"]: e for e in main if e["model"] == model
                       and e["method"] == method}
            xs = [j + (i - 1) * width for j, d in enumerate(datasets) if d in by_data]
            means = [by_data[d]["auc_mean"] for d in datasets if d in by_data]
            stds = [by_data[d]["auc_std"] or 0.0 for d in datasets if d in by_data]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=method if ax is axes[0][0]
                   else None, color=f"C{i}")
        ax.set_title(model)
        ax.set_xticks(range(len(datasets)), datasets, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test AUC (mean ± std over seeds)")
    lows = [e["auc_mean"] - (e["auc_std"] or 0.0) for e in main]
    highs = [e["auc_mean"] + (e["auc_std"] or 0.0) for e in main]
    axes[0][0].set_ylim(max(0.0, min(lows) - 0.03), min(1.0, max(highs) + 0.02))
    fig.legend(loc="upper center", ncol=len(MAIN_METHODS), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write_tables(workdir: str, rows: list[dict], meta: dict) -> str:
    """``paper_table.{md,json,csv}``, ``ablation.md`` and ``paper_auc.png``; returns the md."""
    summary = summarise(rows)
    md = ["# Base vs on-device fine-tuning vs DUET\n",
          "Test metrics, mean ± std over seeds (n = seeds). `adapt ms/device`: wall time of "
          "a device's adaptation (fine-tuning steps, or DUET's head generation), vmapped "
          "groups, after warm-up, on the cell's own machine (`cell_machines` in "
          "paper_table.json).\n",
          markdown(summary, MAIN_METHODS)]
    ablation = [e for e in summary if e["method"] in ABLATION_METHODS[1:]]
    # the ablation table: only the (dataset, model) pairs that ran ablations, DUET beside them
    pairs = {(e["dataset"], e["model"]) for e in ablation}
    ablation_table = markdown([e for e in summary if (e["dataset"], e["model"]) in pairs],
                              ABLATION_METHODS, ABLATION_LABELS)
    if ablation:
        md += ["\n## Ablation of DUET\n", ablation_table]
    if meta.get("missing"):
        md += ["\n## Missing cells\n"]
        md += [f"- {m}\n" for m in meta["missing"]]
    if meta.get("unverified"):
        md += ["\n## Unverified cells\n",
               "Made before data fingerprints existed, and not checked against today's data "
               "(run without `--report_only`, with the raw files present, to check and stamp "
               "them):\n"]
        md += [f"- {m}: unverified (made before data fingerprints)\n"
               for m in meta["unverified"]]
    text = "".join(md)
    files.write_text_atomic(os.path.join(workdir, "paper_table.md"), text)
    if ablation:
        files.write_text_atomic(os.path.join(workdir, "ablation.md"), ablation_table)
    files.write_text_atomic(os.path.join(workdir, "paper_table.json"),
                            files.dumps({**meta, "summary": summary, "rows": rows}))
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for e in summary for k in e if k != "seeds"))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary)
    files.write_text_atomic(os.path.join(workdir, "paper_table.csv"), buf.getvalue())
    plot_auc(summary, os.path.join(workdir, "paper_auc.png"))
    return text
