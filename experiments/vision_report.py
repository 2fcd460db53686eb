"""The vision seeds table's pieces (no command-line flags, so any module may import it):
running or reusing one seed, mean +- std over seeds, pooled per-device bootstrap intervals,
markdown, CSV, JSON and the PNG. The command is :mod:`experiments.vision_table`."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from duet_jax import files, stats
from experiments import vision

TABLE_METRICS = ("val_accuracy", "test_accuracy", "test_device_accuracy", "test_macro_f1",
                 "test_ece")
PAIRS = (("duet", "base"), ("duet", "base_wide"), ("duet_request", "base"),
         ("duet_shuffled", "base"), ("duet_mean_z", "base"), ("base_wide", "base"),
         ("finetune_head", "base"), ("finetune_all", "base"), ("duet", "finetune_all"))


def _identity(config: dict) -> dict:
    return json.loads(json.dumps(config, default=list))


def run_seed(config, seed: int, workdir: str) -> dict:
    """The stored run of ``seed`` if made under the same config, else a new one."""
    path = os.path.join(workdir, f"seed{seed}", "results.json")
    with config.unlocked():
        config.seed = seed
    wanted = _identity(config.to_dict())
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("config") == wanted:
            return stored
    result = vision.run(config)
    vision.write_results(os.path.dirname(path), result, config.to_dict())
    with open(path) as f:
        return json.load(f)


def aggregate(results: list[dict], num_resamples: int = 1000) -> dict:
    """Mean, std (ddof=1) over seeds per method and metric, and pooled per-device bootstrap
    intervals (every seed's devices, a fleet of its own, as units)."""
    methods = [r["method"] for r in results[0]["rows"]]
    table = []
    for name in methods:
        rows = [next(r for r in res["rows"] if r["method"] == name) for res in results]
        entry = {"method": name, "seeds": len(rows), "params": rows[0]["params"]}
        for metric in TABLE_METRICS:
            values = np.array([r[metric] for r in rows], np.float64)
            entry[metric] = {"mean": float(values.mean()),
                             "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                             "values": values.tolist()}
        entry["selected"] = [r["selected"] for r in rows]
        table.append(entry)
    pairs = {}
    for a, b in PAIRS:
        if a in methods and b in methods:
            diffs = np.concatenate([np.array(res["per_device_test_accuracy"][a])
                                    - np.array(res["per_device_test_accuracy"][b])
                                    for res in results])
            pairs[f"{a}_vs_{b}"] = stats.bootstrap_mean_ci(diffs, num_resamples=num_resamples)
            pairs[f"{a}_vs_{b}"]["per_seed"] = [
                res["paired_bootstrap"].get(f"{a}_vs_{b}") for res in results]
    return {"table": table, "paired_bootstrap": pairs, "data": results[0]["data"],
            "param_match": [r["param_match"] for r in results],
            "seeds": [r["seed"] for r in results]}


def markdown(agg: dict) -> str:
    head = ["method", "params", *TABLE_METRICS]
    lines = [f"Mean ± std over seeds {agg['seeds']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in agg["table"]:
        cells = [e["method"], str(e["params"])] + [
            f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" for k in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-device paired bootstrap of the test-accuracy difference (devices of all "
              "seeds pooled; 95% percentile interval, 1,000 resamples):", "",
              "| comparison | mean diff | 95% CI | p | devices |", "|---|---|---|---|---|"]
    for name, ci in agg["paired_bootstrap"].items():
        lines.append(f"| {name} | {ci['mean']:+.4f} | [{ci['lo']:+.4f}, {ci['hi']:+.4f}] | "
                     f"{ci['p_value']:.3f} | {ci['num_users']} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["method"] for e in agg["table"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for off, metric, label in ((-0.2, "val_accuracy", "validation (cloud period)"),
                               (0.2, "test_accuracy", "device-test (drifted)")):
        mean = [e[metric]["mean"] for e in agg["table"]]
        std = [e[metric]["std"] for e in agg["table"]]
        ax.bar(x + off, mean, 0.4, yerr=std, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Digits fleet: mean ± std over seeds {agg['seeds']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write(agg: dict, workdir: str) -> str:
    table = markdown(agg)
    files.write_text_atomic(os.path.join(workdir, "vision_table.md"), table)
    files.write_text_atomic(os.path.join(workdir, "vision_table.json"), files.dumps(agg))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "params", *(f"{k}_{s}" for k in TABLE_METRICS
                                          for s in ("mean", "std"))])
    for e in agg["table"]:
        writer.writerow([e["method"], e["params"], *(f"{e[k][s]:.6f}" for k in TABLE_METRICS
                                                     for s in ("mean", "std"))])
    files.write_text_atomic(os.path.join(workdir, "vision_table.csv"), buf.getvalue())
    plot(agg, os.path.join(workdir, "vision_accuracy.png"))
    return table
