"""Accuracy of the generator encoders: DUET with each encoder over seeds, against ``gru``.

    python -m experiments.encoder_accuracy --root=runs/encoder_accuracy \\
        --out=runs/encoder_accuracy/report

Each (seed, encoder) cell is one run of the main job (:mod:`experiments.main`) in
``<root>/seed<k>/<encoder>``, with ``--config.seed=k --config.generator.encoder=<encoder>``
and every ``--set`` override; the reference encoder's cell also trains Base, once per seed.
A cell whose ``results.json`` already holds that configuration is not run again, and an
unfinished one resumes from its checkpoints (the main job's own resume); ``--collect_only``
only reads the finished cells. Selection is the main job's: the parameters with the best
validation score; the table reports their test metrics.

Writes ``results.json`` and ``encoder_accuracy.md`` to ``--out``: per encoder the test AUC
and UAUC, mean ± sample standard deviation over seeds, and the paired (same-seed)
difference from the reference encoder and from Base.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from absl import flags

from duet_jax import files
from duet_jax.errors import ConfigError
from experiments import cli
from experiments import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("auc", "uauc")  # in the table; results.json also keeps logloss and val_<select>
KEPT = ("auc", "uauc", "logloss")
BASE = "base"  # the key Base's values are stored under, beside the encoders

# The flags are defined when the entry point runs (run()), not on import: the test imports
# this module beside other entry points whose flags share names (--out, --seeds, --config).
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags() -> None:
    """Define this entry point's flags (once)."""
    if _FLAGS:
        return
    _FLAGS["config"] = flags.DEFINE_string(
        "config", "experiments/configs/movielens_100k.py",
        "Main-job config file of every cell.")
    _FLAGS["root"] = flags.DEFINE_string("root", None, "Directory of the cells' workdirs.",
                                         required=True)
    _FLAGS["out"] = flags.DEFINE_string(
        "out", None, "Where results.json and encoder_accuracy.md go.", required=True)
    _FLAGS["encoders"] = flags.DEFINE_list("encoders", ["gru", "attention", "gru_bf16"],
                                           "Generator encoders to compare.")
    _FLAGS["reference"] = flags.DEFINE_string(
        "reference", "gru", "The encoder the others are compared with (trains Base too).")
    _FLAGS["seeds"] = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed).")
    _FLAGS["set"] = flags.DEFINE_multi_string(
        "set", [], "FIELD=VALUE passed to every cell as --config.FIELD=VALUE "
        "(e.g. train.num_epochs=4); not seed, generator.encoder or methods.")
    _FLAGS["collect_only"] = flags.DEFINE_bool("collect_only", False,
                                               "Only read the finished cells; run nothing.")


OWN_FIELDS = ("seed", "generator.encoder", "methods")  # what the grid itself sets per cell


def cell_dir(root: str, seed: int, encoder: str) -> str:
    """``<root>/seed<k>/<encoder>``: one main-job workdir."""
    return os.path.join(root, f"seed{seed}", encoder)


def cell_methods(encoder: str, reference: str) -> str:
    """``config.methods`` of a cell: Base is trained beside the reference encoder only."""
    return f"{BASE},duet" if encoder == reference else "duet"


def cell_command(config_file: str, workdir: str, seed: int, encoder: str, reference: str,
                 overrides: Sequence[str]) -> list[str]:
    """The main-job command line of one cell."""
    return [
        sys.executable, "-m", "experiments.main", f"--config={config_file}",
        f"--workdir={workdir}", f"--config.seed={seed}",
        f"--config.generator.encoder={encoder}",
        f"--config.methods={cell_methods(encoder, reference)}",
        *(f"--config.{item}" for item in overrides),
    ]


def parse_overrides(overrides: Sequence[str]) -> dict[str, object]:
    """``{"train.num_epochs": 4}`` from ``["train.num_epochs=4"]``; refuses the grid's own
    fields and anything without ``=``."""
    out = {}
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        if path in OWN_FIELDS:
            raise ValueError(f"--set {path}: the grid sets it per cell")
        out[path] = config_lib.parse_value(text)
    return out


def _field(config: Mapping, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def record_matches(record: Mapping, seed: int, encoder: str, reference: str,
                   overrides: Mapping[str, object]) -> bool:
    """Whether a cell's ``results.json`` is the run this cell asks for: same seed, encoder,
    methods and every override's value (tuples compare as the lists JSON stores)."""
    config = record.get("config", {})
    want = {"seed": seed, "generator.encoder": encoder,
            "methods": cell_methods(encoder, reference), **overrides}
    for path, value in want.items():
        try:
            got = _field(config, path)
        except (KeyError, TypeError):
            return False
        if isinstance(value, tuple):
            value = list(value)
        if got != value:
            return False
    return True


def load_cell(workdir: str, seed: int, encoder: str, reference: str,
              overrides: Mapping[str, object]) -> dict | None:
    """The cell's ``results.json`` if it is finished with this configuration, else None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record_matches(record, seed, encoder, reference, overrides) else None


def cell_values(record: Mapping) -> dict[str, dict[str, float]]:
    """``{"duet": {...}, "base": {...}}``: the kept metrics of a cell's DUET and Base rows
    (Base only in the reference cell), plus the validation score that selected them."""
    select = record["config"]["train"]["select_metric"]
    out = {}
    for row in record["rows"]:
        if row["method"] in ("duet", BASE):
            values = {k: row[k] for k in KEPT}
            values[f"val_{select}"] = row[f"val_{select}"]
            values["best_epoch"] = row.get("best_epoch")
            values["train_seconds"] = row.get("train_seconds")
            out[row["method"]] = values
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(values: Mapping[str, Mapping[int, Mapping[str, float]]], reference: str,
              metrics: Sequence[str] = METRICS) -> dict:
    """Per key of ``values`` (an encoder, or Base) and metric: the seed-wise values, their
    mean and sample sd, and the paired differences ``key - reference`` and ``key - Base``
    on the seeds both have (with their mean and sd).

    ``values[key][seed][metric]``; the reference and Base are compared with themselves too
    (differences 0), so every row of the table has the same columns.
    """
    out = {}
    for key, by_seed in values.items():
        entry = {}
        for metric in metrics:
            seeds = sorted(by_seed)
            vals = [by_seed[s][metric] for s in seeds]
            mean, sd = mean_sd(vals)
            stats = {"seeds": seeds, "values": vals, "mean": mean, "sd": sd}
            for name, other in (("vs_reference", reference), ("vs_base", BASE)):
                if other not in values:
                    continue
                common = [s for s in seeds if s in values[other]]
                diffs = [by_seed[s][metric] - values[other][s][metric] for s in common]
                d_mean, d_sd = mean_sd(diffs) if diffs else (None, None)
                stats[name] = {"seeds": common, "values": diffs, "mean": d_mean, "sd": d_sd}
            entry[metric] = stats
        out[key] = entry
    return out


def _pm(mean: float | None, sd: float | None, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if sd is None else f"{text} ± {sd:.4f}"


def _seedwise(values: Sequence[float], signed: bool = False) -> str:
    return " / ".join(f"{v:+.4f}" if signed else f"{v:.4f}" for v in values)


def markdown(summary: Mapping, reference: str, command: str, cell_template: str,
             cells: Sequence[Mapping] = (), notes: Sequence[str] = ()) -> str:
    """The report: the metrics table, the paired differences and how it was made."""
    keys = [k for k in summary if k != BASE] + ([BASE] if BASE in summary else [])
    seeds = next(iter(summary.values()))[METRICS[0]]["seeds"] if summary else []
    label = {BASE: "Base (no generator)"}
    lines = [
        "# Generator encoders: test accuracy over seeds", "",
        f"Seeds {', '.join(map(str, seeds))}; mean ± sample sd (n - 1) over seeds; "
        f"paired differences are taken seed by seed (same seed, same data) against "
        f"`{reference}` and against Base, then averaged. Seed-wise values in seed order.", "",
        "| encoder | test AUC | test UAUC | AUC − " + reference + " | UAUC − " + reference
        + " | AUC − Base | UAUC − Base |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        row = summary[key]
        out = [label.get(key, f"`{key}`"), _pm(row["auc"]["mean"], row["auc"]["sd"]),
               _pm(row["uauc"]["mean"], row["uauc"]["sd"])]
        for name in ("vs_reference", "vs_base"):
            for metric in METRICS:
                diff = row[metric].get(name)
                same = key == (reference if name == "vs_reference" else BASE)
                out.append("–" if diff is None or same
                           else _pm(diff["mean"], diff["sd"], signed=True))
        lines.append("| " + " | ".join(out) + " |")
    lines += ["", "Seed-wise values:", "",
              "| encoder | test AUC | test UAUC | AUC − " + reference + " | UAUC − "
              + reference + " |", "|---|---|---|---|---|"]
    for key in keys:
        row = summary[key]
        out = [label.get(key, f"`{key}`"), _seedwise(row["auc"]["values"]),
               _seedwise(row["uauc"]["values"])]
        for metric in METRICS:
            diff = row[metric].get("vs_reference")
            out.append("–" if diff is None or key == reference
                       else _seedwise(diff["values"], signed=True))
        lines.append("| " + " | ".join(out) + " |")
    if cells:
        lines += ["", "Cells (DUET's best epoch and training seconds, from the run's record; "
                  "wall seconds where this command ran the cell):", "",
                  "| seed | encoder | best epoch | train s | wall s |", "|---|---|---|---|---|"]
        for cell in cells:
            duet = (cell["values"] or {}).get("duet", {})
            wall = cell.get("wall_seconds")
            lines.append(f"| {cell['seed']} | `{cell['encoder']}` | "
                         f"{duet.get('best_epoch', '–')} | {duet.get('train_seconds', '–')} | "
                         f"{'–' if wall is None else wall} |")
    lines += ["", "Command:", "", "```", command, "```", "",
              "Each cell (seed k, encoder E) is one main-job run:", "", "```",
              cell_template, "```", ""]
    if notes:
        lines += [*notes, ""]
    return "\n".join(lines)


def run_grid(config_file: str, root: str, encoders: Sequence[str], seeds: Sequence[int],
             reference: str, overrides: Sequence[str], collect_only: bool) -> list[dict]:
    """Run (or resume, or reuse) every cell; one record per cell, None ``values`` where a
    cell is not finished."""
    parsed = parse_overrides(overrides)
    cells = []
    for seed in seeds:
        for encoder in encoders:
            workdir = cell_dir(root, seed, encoder)
            cmd = cell_command(config_file, workdir, seed, encoder, reference, overrides)
            record = load_cell(workdir, seed, encoder, reference, parsed)
            wall = _stored_wall(workdir)
            if record is None and not collect_only:
                print(f"running seed {seed} {encoder}: {shlex.join(cmd)}", flush=True)
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT)
                wall = round(time.perf_counter() - start, 1)
                print(f"seed {seed} {encoder}: exit {proc.returncode}, {wall} s", flush=True)
                record = load_cell(workdir, seed, encoder, reference, parsed)
                files.write_text_atomic(os.path.join(workdir, "encoder_accuracy_cell.json"),
                                        files.dumps({"command": cmd, "wall_seconds": wall,
                                                     "returncode": proc.returncode}))
            cells.append({
                "seed": seed, "encoder": encoder, "workdir": os.path.abspath(workdir),
                "command": shlex.join(cmd),
                "wall_seconds": wall,
                "values": cell_values(record) if record else None,
                "processor": (record or {}).get("environment", {}).get("processor"),
                "code": (record or {}).get("environment", {}).get("code"),
            })
    return cells


def _stored_wall(workdir: str) -> float | None:
    """The wall time an earlier invocation recorded for a cell it ran, if any."""
    path = os.path.join(workdir, "encoder_accuracy_cell.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("wall_seconds")


def collect(cells: Sequence[Mapping], reference: str) -> dict:
    """``values[key][seed][metric]`` for :func:`aggregate` from finished cells: DUET under
    its encoder, Base (from the reference cells) under ``"base"``."""
    values: dict[str, dict[int, dict]] = {}
    for cell in cells:
        if cell["values"] is None:
            continue
        values.setdefault(cell["encoder"], {})[cell["seed"]] = cell["values"]["duet"]
        if cell["encoder"] == reference and BASE in cell["values"]:
            values.setdefault(BASE, {})[cell["seed"]] = cell["values"][BASE]
    return values


def main(argv: list[str]) -> None:
    cli.start(argv)
    flag = {name: holder.value for name, holder in _FLAGS.items()}
    encoders, reference = list(flag["encoders"]), flag["reference"]
    if reference not in encoders:
        raise ConfigError("--reference", reference, f"one of --encoders {encoders}")
    seeds = [int(s) for s in flag["seeds"]]
    try:
        parse_overrides(flag["set"])
    except ValueError as err:
        raise ConfigError("--set", flag["set"], str(err)) from None
    cells = run_grid(flag["config"], flag["root"], encoders, seeds, reference, flag["set"],
                     flag["collect_only"])
    missing = [f"seed {c['seed']} {c['encoder']}" for c in cells if c["values"] is None]
    summary = aggregate(collect(cells, reference), reference)
    command = shlex.join(["python", "-m", "experiments.encoder_accuracy", *sys.argv[1:]])
    template = " ".join([
        "python -m experiments.main", f"--config={flag['config']}",
        f"--workdir={os.path.join(flag['root'], 'seed<k>', '<E>')}", "--config.seed=<k>",
        "--config.generator.encoder=<E>", "--config.methods=<M>",
        *(f"--config.{item}" for item in flag["set"]),
    ]) + f"  # <M> = {cell_methods(reference, reference)} for <E> = {reference}, else duet"
    notes = [f"Missing cells (not finished): {', '.join(missing)}."] if missing else []
    os.makedirs(flag["out"], exist_ok=True)
    payload = {"command": command, "cell_command": template, "config_file": flag["config"],
               "overrides": list(flag["set"]), "encoders": encoders, "reference": reference,
               "seeds": seeds, "missing": missing, "summary": summary, "cells": cells}
    files.write_text_atomic(os.path.join(flag["out"], "results.json"), files.dumps(payload))
    table = markdown(summary, reference, command, template, cells, notes)
    files.write_text_atomic(os.path.join(flag["out"], "encoder_accuracy.md"), table)
    print(table)
    print(f"written to {os.path.abspath(flag['out'])}/{{results.json,encoder_accuracy.md}}")


def run() -> None:
    define_flags()
    cli.entry_point(main)()


if __name__ == "__main__":
    run()
