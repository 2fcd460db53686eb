"""The report of the adaptation grid: a table with paired per-user bootstrap CIs, AUC vs sync
lag, and DUET's gain by device drift quartile (:mod:`experiments.adapt_grid`)."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from duet_jax import drift, files, metrics, stats
from experiments import adapt_cell, report

# (label, scores a, scores b): each compared on the same device-test rows
COMPARISONS = (
    ("DUET vs Base", "duet/lag0", "base/lag0"),
    ("DUET vs base_wide (capacity)", "duet/lag0", "base_wide/lag0"),
    ("DUET vs shuffled trigger", "duet/lag0", "duet_shuffled/lag0"),
    ("DUET vs one mean z", "duet/lag0", "duet_mean/lag0"),
    ("DUET-once vs fine-tuning (head)", "duet/once", "finetune_head/once"),
    ("DUET-once vs fine-tuning (all)", "duet/once", "finetune_all/once"),
)
# rows of the metrics table: what each device is served
SERVED = ("base/lag0", "base_wide/lag0", "duet/lag0", "duet/once", "finetune_head/once",
          "finetune_all/once", "duet_shuffled/lag0", "duet_mean/lag0")


def per_user_auc(user: np.ndarray, label: np.ndarray, scores: np.ndarray,
                 num_users: int) -> np.ndarray:
    """``[num_users]`` AUC of each user's own rows (NaN without both labels or rows)."""
    ids, values, has_both = metrics.per_user(user, label, scores, "uauc")
    out = np.full(num_users, np.nan)
    out[ids] = np.where(has_both, values, np.nan)
    return out


def cell_statistics(preds: dict[str, np.ndarray], num_resamples: int, seed: int) -> dict:
    """Paired bootstrap CIs of every comparison, lag curve points and drift quartiles."""
    user, label = preds["user"], preds["label"]
    out = {"comparisons": {}, "lags": {}, "drift": {}}
    for name, a, b in COMPARISONS:
        if a in preds and b in preds:
            out["comparisons"][name] = stats.paired_bootstrap(
                user, label, preds[a], preds[b], metric="auc", num_resamples=num_resamples,
                seed=seed)
    for key, value in preds.items():
        method, _, variant = key.partition("/")
        if variant.startswith("lag"):
            out["lags"].setdefault(method, {})[int(variant[3:])] = metrics.auc(label, value)
    num_users = int(user.max()) + 1
    per_user = {k: per_user_auc(user, label, preds[k], num_users)
                for k in ("duet/lag0", "base/lag0", "base_wide/lag0") if k in preds}
    scores = preds["drift"]
    if "duet/lag0" in per_user:
        for other in ("base/lag0", "base_wide/lag0"):
            if other in per_user:
                out["drift"][other.split("/")[0]] = drift.quartile_gains(
                    scores, per_user["duet/lag0"], per_user[other])
    return out


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"  # one seed: no spread to report
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def seed_summaries(groups: dict) -> dict[tuple[str, str, str], dict]:
    """Per (dataset, model, comparison): the mean and sd (ddof 1; None for one seed) of the
    per-seed AUC differences, the seeds compared, and how many of their paired CIs lie above
    and below 0. ``groups``: ``(dataset, model) -> [(seed, record, cell statistics)]``."""
    out = {}
    for (dataset, model), entries in groups.items():
        for name, _, _ in COMPARISONS:
            found = [s["comparisons"][name] for _, _, s in entries if name in s["comparisons"]]
            if not found:
                continue
            diffs = [c["diff"] for c in found]
            out[(dataset, model, name)] = {
                "mean": float(np.mean(diffs)),
                "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                "seeds": len(found),
                "above": sum(c["lo"] > 0 for c in found),
                "below": sum(c["hi"] < 0 for c in found)}
    return out


def _fmt_summary(summary: dict | None) -> str:
    if summary is None:
        return "–"
    spread = "" if summary["sd"] is None else f" ± {summary['sd']:.4f}"
    below = f", {summary['below']} below" if summary["below"] else ""
    return f"{summary['mean']:+.4f}{spread} ({summary['above']}/{summary['seeds']} above{below})"


def write_report(workdir: str, done: dict, missing: list[str], command: str,
                 num_resamples: int, ignored: list[str] | tuple[str, ...] = ()) -> str:
    """Write ``adaptation.{md,json}``, ``lags.png`` and ``drift.png``; return the markdown.
    ``ignored``: finished cells in the workdir that the report leaves out, with the reason."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    cells = []
    for (dataset, model, seed), (path, record) in sorted(done.items()):
        cell_stats = cell_statistics(adapt_cell.load_predictions(path), num_resamples, seed)
        groups[(dataset, model)].append((seed, record, cell_stats))
        cells.append({"dataset": dataset, "model": model, "seed": seed,
                      "metrics": record["metrics"], "selection": record["selection"],
                      "finetune": record["finetune"], "params": record["params"],
                      **cell_stats})
    lines = ["# Does DUET adapt devices?", "", f"Command: `{command}`", ""]
    if missing:
        lines += [f"**Missing cells ({len(missing)})**: " + "; ".join(missing), ""]
    if ignored:
        lines += [f"**Not part of this report ({len(ignored)})**: " + "; ".join(ignored), ""]
    lines += ["## Device-test AUC (mean ± sd over seeds)", "",
              "| dataset | model | seeds | " + " | ".join(SERVED) + " |",
              "|---|---|---|" + "---|" * len(SERVED)]
    for (dataset, model), entries in sorted(groups.items()):
        cols = [_fmt([r["metrics"].get(k, {}).get("auc") for _, r, _ in entries])
                for k in SERVED]
        lines.append(f"| {dataset} | {model} | {len(entries)} | " + " | ".join(cols) + " |")
    lines += ["", "## Paired per-user bootstrap: AUC difference [95% CI], per seed", "",
              "A `*` marks a CI that excludes 0.", "",
              "| dataset | model | seed | " + " | ".join(c[0] for c in COMPARISONS) + " |",
              "|---|---|---|" + "---|" * len(COMPARISONS)]
    for (dataset, model), entries in sorted(groups.items()):
        for seed, _, s in entries:
            cols = []
            for name, _, _ in COMPARISONS:
                c = s["comparisons"].get(name)
                if c is None:
                    cols.append("–")
                    continue
                significant = c["lo"] > 0 or c["hi"] < 0
                cols.append(f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"
                            + ("*" if significant else ""))
            lines.append(f"| {dataset} | {model} | {seed} | " + " | ".join(cols) + " |")
    over_seeds = seed_summaries(groups)
    lines += ["", "## Over seeds: mean ± sd of the per-seed differences", "",
              "In brackets: the seeds whose CI lies above 0 (and below 0, if any).", "",
              "| dataset | model | seeds | " + " | ".join(c[0] for c in COMPARISONS) + " |",
              "|---|---|---|" + "---|" * len(COMPARISONS)]
    for (dataset, model), entries in sorted(groups.items()):
        cols = [_fmt_summary(over_seeds.get((dataset, model, name))) for name, _, _ in COMPARISONS]
        lines.append(f"| {dataset} | {model} | {len(entries)} | " + " | ".join(cols) + " |")
    # cell counts: the (dataset, model) summaries summed
    wins = {name: [sum(v[k] for (_, _, n), v in over_seeds.items() if n == name)
                   for k in ("above", "seeds")] for name, _, _ in COMPARISONS}
    lines += ["", "Cells where the first method wins with a CI above 0: "
              + "; ".join(f"{n}: {w}/{t}" for n, (w, t) in wins.items() if t), ""]
    _panel_figure(workdir, groups, "lags.png", _draw_lags,
                  "sync lag k (positions since the device's last sync)", "device-test AUC")
    _panel_figure(workdir, groups, "drift.png", _draw_drift,
                  "device drift quartile (1 = least drift)", "mean per-user AUC gain")
    lines += ["![AUC vs sync lag](lags.png)", "", "![DUET gain by drift quartile](drift.png)", ""]
    text = "\n".join(lines)
    files.write_text_atomic(os.path.join(workdir, "adaptation.md"), text)
    files.write_text_atomic(os.path.join(workdir, "adaptation.json"), files.dumps(
        {"command": command, "missing": missing, "ignored": list(ignored), "cells": cells,
         "over_seeds": [{"dataset": d, "model": m, "comparison": n, **v}
                        for (d, m, n), v in sorted(over_seeds.items())],
         "environment": report.environment()}))
    return text


def _panel_figure(workdir: str, groups: dict, filename: str, draw, xlabel: str,
                  ylabel: str) -> None:
    """One panel per (dataset, model) drawn by ``draw(ax, entries)``, saved as PNG (no
    empty panels; nothing is written without a finished cell)."""
    if not groups:
        return
    n = len(groups)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    for ax, ((dataset, model), entries) in zip(axes.flat, sorted(groups.items()),
                                               strict=False):
        draw(ax, entries)
        ax.set_title(f"{dataset} / {model}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with files.atomic_file(os.path.join(workdir, filename), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _draw_lags(ax, entries: list) -> None:
    for method, style in (("duet", "o-"), ("base_wide", "s--"), ("base", "k:")):
        lags = sorted({k for _, _, s in entries for k in s["lags"].get(method, {})})
        if not lags:
            continue
        means = [np.mean([s["lags"][method][k] for _, _, s in entries
                          if k in s["lags"].get(method, {})]) for k in lags]
        if method == "base":  # reads no trigger: one value for every lag
            ax.axhline(means[0], color="k", ls=":", label="Base")
        else:
            ax.plot(lags, means, style, label=method)
    for key, color in (("duet/once", "C3"), ("finetune_head/once", "C2"),
                       ("finetune_all/once", "C4")):
        values = [r["metrics"][key]["auc"] for _, r, _ in entries if key in r["metrics"]]
        if values:
            ax.axhline(np.mean(values), color=color, ls="-.", lw=1, label=key)


def _draw_drift(ax, entries: list) -> None:
    for other, color in (("base", "C0"), ("base_wide", "C1")):
        quarts = [s["drift"].get(other) for _, _, s in entries if s["drift"].get(other)]
        if quarts:
            mean = [np.nanmean([q[i]["gain_mean"] for q in quarts]) for i in range(4)]
            ax.plot([1, 2, 3, 4], mean, "o-", color=color, label=f"DUET − {other}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([1, 2, 3, 4])
