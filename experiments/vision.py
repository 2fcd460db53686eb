"""The vision job: Base, base_wide, fine-tuning and DUET on an image fleet with device shift.

    python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits

(``experiments.main`` hands a config with ``task = "vision"`` to :func:`main_job`.) Trains
each method on the cloud-train split, selects it (training step; fine-tuning's learning rate
and step count) on validation accuracy, evaluates device-test once, prints the table and
writes ``results.{json,csv,md}`` to the workdir.

Test-time variants of the trained DUET: ``duet`` (a head per device, generated once from the
device's recent unlabelled images), ``duet_request`` (a head per request: the set is the
device's recent images with the oldest replaced by the request's own image),
``duet_shuffled`` (each device served another device's set), ``duet_mean_z`` (one head from
the population-mean ``z``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from duet_jax import files, stats
from duet_jax.errors import ConfigError
from duet_jax.generator import ParameterGenerator
from duet_jax.vision import data as data_lib
from duet_jax.vision import methods as m
from duet_jax.vision import metrics as metrics_lib
from duet_jax.vision.model import VisionConfig, vision_model
from experiments import report

TRAINED = ("base", "base_wide", "duet", "finetune_head", "finetune_all")
DUET_VARIANTS = ("duet", "duet_request", "duet_shuffled", "duet_mean_z")
METRICS = ("accuracy", "device_accuracy", "macro_f1", "ece", "nll")
COLUMNS = ("method", "val_accuracy", "test_accuracy", "test_device_accuracy", "test_macro_f1",
           "test_ece", "test_nll", "params", "selected")


def _dataclass_from(cls, section: ml_collections.ConfigDict | None, prefix: str, **extra):
    """``cls`` built from a config section; an unknown field raises :class:`ConfigError`."""
    values = dict(section.to_dict()) if section is not None else {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", values[key], f"a field of {cls.__name__}: "
                              f"{sorted(names)}")
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return cls(**{**values, **extra})


def parse(config: ml_collections.ConfigDict):
    """-> ``(FleetConfig, vision sizes dict, VisionTrainConfig, methods)``."""
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError("config.seed", seed, "an integer >= 0")
    fleet = _dataclass_from(data_lib.FleetConfig, config.get("data"), "config.data", seed=seed)
    sizes = dict(config.vision.to_dict()) if config.get("vision") is not None else {}
    allowed = {"stem_channels", "blocks", "head_hidden"}
    for key in sizes:
        if key not in allowed:
            raise ConfigError(f"config.vision.{key}", sizes[key], f"one of {sorted(allowed)}")
    if "blocks" in sizes:
        sizes["blocks"] = tuple(tuple(b) for b in sizes["blocks"])
    train = _dataclass_from(m.VisionTrainConfig, config.get("train"), "config.train")
    names = tuple(x.strip() for x in config.get("methods", ",".join(TRAINED)).split(",")
                  if x.strip())
    bad = [x for x in names if x not in TRAINED]
    if bad or "base" not in names:
        raise ConfigError("config.methods", config.get("methods"),
                          f"comma-separated names from {TRAINED}, including base")
    return fleet, sizes, train, names


def _split_logits_fns(model, method, params, fleet_arrays, set_size: int):
    """Logits of ``method`` on val (sets: each device's first K train images) and on test
    (sets: the device's recent images)."""
    val_sets = fleet_arrays["train_images"][:, :set_size]
    out = {}
    for split, images, sets in (("val", fleet_arrays["val_images"], val_sets),
                                ("test", fleet_arrays["test_images"],
                                 fleet_arrays["recent_images"])):
        mask = jnp.ones(sets.shape[:2], bool)
        out[split] = m.evaluate_logits(method, params, images, sets, mask)
    return out


def duet_variant_logits(model, gen: ParameterGenerator, params, images, sets, seed: int):
    """Logits ``[D, n, C]`` of the DUET variants other than ``duet`` itself."""
    d = images.shape[0]
    shift = 1 + np.random.default_rng([seed, 17]).integers(max(d - 1, 1))
    perm = (np.arange(d) + shift) % d  # a derangement: no device gets its own set
    out = jax.jit(functools.partial(_duet_variants, model, gen))(params, images, sets, perm)
    return {key: np.asarray(v) for key, v in out.items()}


def _duet_variants(model, gen: ParameterGenerator, params, images, sets, perm) -> dict:
    backbone = params["backbone"]
    feats = model.impl.features(backbone, images)  # [D, n, F]
    set_feats = model.impl.features(backbone, sets)  # [D, K, F]
    d, n = feats.shape[:2]
    k = set_feats.shape[1]
    encode = jax.vmap(lambda f, mk: gen.apply(params["generator"], f, mk,
                                              method=ParameterGenerator.encode))
    decode = lambda z: gen.apply(params["generator"], z, method=ParameterGenerator.decode)
    ones = jnp.ones((d, k), bool)
    out = {}
    # per request: the recent set less its oldest image, plus the request's own image
    req_sets = jnp.concatenate(
        [jnp.broadcast_to(set_feats[:, None, 1:], (d, n, k - 1, feats.shape[-1])),
         feats[:, :, None]], axis=2).reshape(d * n, k, -1)
    z = encode(req_sets, jnp.ones((d * n, k), bool))
    heads = decode(z)
    out["duet_request"] = jax.vmap(model.head_logits)(
        heads, feats.reshape(d * n, 1, -1)).reshape(d, n, -1)
    heads = decode(encode(set_feats[perm], ones))
    out["duet_shuffled"] = jax.vmap(model.head_logits)(heads, feats)
    z_mean = encode(set_feats, ones).mean(0)
    out["duet_mean_z"] = model.head_logits(decode(z_mean), feats)
    return out


def run(config: ml_collections.ConfigDict, fleet: data_lib.Fleet | None = None) -> dict:
    """Train, select and evaluate every method; -> the result dict (rows, per-device test
    accuracies, bootstrap intervals, selection, histories, data stats, timings)."""
    fleet_cfg, sizes, tc, names = parse(config)
    start = time.perf_counter()
    fleet = fleet or data_lib.build_fleet(fleet_cfg)
    data_s = time.perf_counter() - start
    h, w, ch = fleet.image_shape
    if h != w:
        raise ConfigError("config.data.image_size", fleet_cfg.image_size,
                          f"square images (the source is {h}x{w}; set image_size)")
    model = vision_model(VisionConfig(image_size=h, channels=ch, num_classes=fleet.num_classes,
                                      **sizes))
    arrays = {f"{s}_{kind}": jnp.asarray(getattr(fleet, kind)[s])
              for s in data_lib.SPLITS for kind in ("images", "labels")}
    labels = {s: np.asarray(fleet.labels[s]) for s in ("val", "test")}
    evaluate = lambda logits, split: metrics_lib.evaluate(logits, labels[split],
                                                          fleet.num_classes, tc.ece_bins)

    key = jax.random.key(fleet_cfg.seed)
    batches = m.sample_batches(np.random.default_rng([fleet_cfg.seed, 1]), fleet.num_devices,
                               fleet.labels["train"].shape[1], tc)
    gen = m.duet_generator(model, tc)
    duet = m.duet_method(model, tc)
    duet_params_count = m.count(jax.eval_shape(duet.init, key))
    wide_hidden = m.wide_hidden(model, tc, duet_params_count)
    built = {"base": m.base_method(model), "duet": duet,
             "base_wide": m.base_wide_method(model, tc, wide_hidden)}
    logits, params_of, histories, counts, seconds, selected = {}, {}, {}, {}, {}, {}
    val_sets = arrays["train_images"][:, :tc.set_size]  # validation: cloud-period sets
    val_mask = jnp.ones(val_sets.shape[:2], bool)
    for name in ("base", "base_wide", "duet"):
        if name not in names:
            continue
        method = built[name]
        validate = lambda p, method=method: float(metrics_lib.per_device_accuracy(
            m.evaluate_logits(method, p, arrays["val_images"], val_sets, val_mask),
            labels["val"]).mean())
        t0 = time.perf_counter()
        params, hist = m.train(method, jax.random.fold_in(key, TRAINED.index(name)),
                               arrays["train_images"], arrays["train_labels"], batches, tc,
                               validate)
        seconds[name] = time.perf_counter() - t0
        best = max(hist, key=lambda r: (r["val_accuracy"], -r["step"]))
        selected[name] = {"step": best["step"]}
        params_of[name], histories[name], counts[name] = params, hist, m.count(params)
        logits[name] = _split_logits_fns(model, method, params, arrays, tc.set_size)
    if "duet" in names:
        p = params_of["duet"]
        for split, images, sets in (("val", arrays["val_images"], val_sets),
                                    ("test", arrays["test_images"], arrays["recent_images"])):
            for variant, lg in duet_variant_logits(model, gen, p, images, sets,
                                                   fleet_cfg.seed).items():
                logits.setdefault(variant, {})[split] = lg
        for variant in DUET_VARIANTS[1:]:
            counts[variant] = counts["duet"]
        # one device's adaptation: generating its head from its recent set (jitted, warm)
        one = jax.jit(lambda p, s: m.generate_heads(model, gen, p, s, jnp.ones(s.shape[:2],
                                                                                bool)))
        sets1 = arrays["recent_images"][:1]
        jax.block_until_ready(one(p, sets1))
        t0 = time.perf_counter()
        for _ in range(20):
            jax.block_until_ready(one(p, sets1))
        selected["duet"]["adapt_ms_per_device"] = 1e3 * (time.perf_counter() - t0) / 20
    n_tune = fleet.labels["recent"].shape[1]
    for mode in ("head", "all"):
        name = f"finetune_{mode}"
        if name not in names:
            continue
        t0 = time.perf_counter()
        max_steps = max(tc.finetune_steps)
        best = None
        for lr in tc.finetune_lrs:  # select (lr, steps) on validation
            curve = np.asarray(m.finetune_curve(
                model, params_of["base"], mode, lr, max_steps,
                arrays["train_images"][:, :n_tune], arrays["train_labels"][:, :n_tune],
                arrays["val_images"]))
            for steps in tc.finetune_steps:
                acc = float(metrics_lib.per_device_accuracy(curve[steps - 1],
                                                            labels["val"]).mean())
                if best is None or acc > best[0]:
                    best = (acc, lr, steps, curve[steps - 1])
        _, lr, steps, val_logits = best
        test_curve = np.asarray(m.finetune_curve(  # max_steps as above: one compilation
            model, params_of["base"], mode, lr, max_steps, arrays["recent_images"],
            arrays["recent_labels"], arrays["test_images"]))
        logits[name] = {"val": val_logits, "test": test_curve[steps - 1]}
        selected[name] = {"learning_rate": lr, "steps": steps}
        counts[name] = counts["base"] if mode == "all" else m.count(params_of["base"]["head"])
        seconds[name] = time.perf_counter() - t0

    rows, per_device = [], {}
    for name, lg in logits.items():
        val, test = evaluate(lg["val"], "val"), evaluate(lg["test"], "test")
        per_device[name] = metrics_lib.per_device_accuracy(lg["test"], labels["test"]).tolist()
        rows.append({"method": name, "val_accuracy": val["accuracy"],
                     **{f"test_{k}": v for k, v in test.items()},
                     **{f"val_{k}": v for k, v in val.items() if k != "accuracy"},
                     "params": counts.get(name), "selected": selected.get(name, {}),
                     "train_s": seconds.get(name)})
    comparisons = {}
    for a, b in (("duet", "base"), ("duet", "base_wide"), ("duet_request", "base"),
                 ("base_wide", "base"), ("finetune_all", "base"), ("finetune_head", "base")):
        if a in per_device and b in per_device:
            diff = np.array(per_device[a]) - np.array(per_device[b])
            comparisons[f"{a}_vs_{b}"] = stats.bootstrap_mean_ci(
                diff, num_resamples=config.get("bootstrap_resamples", 1000), seed=fleet_cfg.seed)
    return {
        "task": "vision", "seed": fleet_cfg.seed, "rows": rows,
        "per_device_test_accuracy": per_device, "paired_bootstrap": comparisons,
        "histories": histories, "data": fleet.stats(), "data_s": data_s,
        "param_match": {"duet": counts.get("duet"), "base_wide": counts.get("base_wide"),
                        "base_wide_hidden": wide_hidden},
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "" if v is None else str(v)


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    lines.append("")
    lines.append("Per-device paired bootstrap (test accuracy difference, 95% CI):")
    for name, ci in result["paired_bootstrap"].items():
        lines.append(f"- {name}: {ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}], "
                     f"p = {ci['p_value']:.3f}, {ci['num_users']} devices")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, result: dict, config: dict) -> str:
    """``results.json`` (everything, with config and environment), ``results.csv`` (rows) and
    ``results.md`` (the table); returns the markdown."""
    os.makedirs(workdir, exist_ok=True)
    files.write_text_atomic(os.path.join(workdir, "results.json"), files.dumps(
        {**result, "config": config, "environment": report.environment()}))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[c for c in COLUMNS if c != "selected"] + ["seed"],
                            extrasaction="ignore")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({**row, "seed": result["seed"]})
    files.write_text_atomic(os.path.join(workdir, "results.csv"), buf.getvalue())
    table = markdown(result)
    files.write_text_atomic(os.path.join(workdir, "results.md"), table)
    return table


def main_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """What ``experiments.main`` runs for ``task = "vision"``: run, print, write."""
    result = run(config)
    print(f"data: {result['data']}", flush=True)
    table = write_results(workdir, result, config.to_dict())
    print(table)
    print(f"results written to {os.path.abspath(workdir)}/results.{{json,csv,md}}")
    return result
