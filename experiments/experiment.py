"""One experiment: prepare data, train and evaluate each method, return one row per method."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import jax
import ml_collections
import numpy as np

from duet_jax import adaptation, cache, files, finetune
from duet_jax import metrics as metrics_lib
from duet_jax.data import authors_format, datasets
from duet_jax.data.cache import cached_splits
from duet_jax.data.samples import Splits, with_trigger
from duet_jax.data.synthetic import build_synthetic
from duet_jax.duet import Duet
from duet_jax.errors import DataError
from duet_jax.methods import DuetOptions, get_method, method_spec, score_at_test_time
from duet_jax.metrics import METRIC_NAMES, METRICS_VERSION
from duet_jax.models import get_model
from duet_jax.training import TrainResult, predict, train_and_evaluate
from experiments import config as config_lib

ROW_KEYS = ("model", "method", *METRIC_NAMES, "seed")


def load_data(config: ml_collections.ConfigDict, workdir: str | None = None) -> Splits:
    """The train/val/test samples the config names (deterministic in ``config.data.seed``).

    Real datasets and the authors' text files are cached under ``workdir/data`` (when a
    workdir is given), so a second run does not rebuild them; the cache key holds the raw
    data's fingerprint (:func:`data_fingerprint`), so changed files are never served from it.
    """
    name = config_lib.dataset_name(config)
    samples = config_lib.sample_config(config)
    seed = config.data.seed
    if name == "synthetic":
        return build_synthetic(config_lib.synthetic_config(config), samples, seed)
    cache_dir = os.path.join(workdir, "data") if workdir else None
    key = {"dataset": name, "seed": seed, "samples": samples.build_fields(),
           "raw": data_fingerprint(config)}
    if name == "authors_text":
        files = config_lib.text_files(config)
        key["val_frac"] = config.data.val_frac

        def build() -> Splits:
            return authors_format.load_splits(**files, seq_len=samples.seq_len,
                                              val_frac=config.data.val_frac)
    else:
        protocol = config_lib.protocol_config(config)
        key["protocol"] = dataclasses.asdict(protocol)
        key["version"] = str(datasets.builder_class(name).VERSION)

        def build() -> Splits:
            return datasets.build_splits(
                name, protocol, samples, seed,
                data_dir=config.data.data_dir or None, tfds_dir=config.data.tfds_dir or None,
            )
    return cached_splits(cache_dir, key, build)


def data_fingerprint(config: ml_collections.ConfigDict) -> dict | None:
    """What the config's samples are built from, by content: the real dataset's raw file
    (member, bytes, sha256; :func:`duet_jax.data.datasets.build_fingerprint`) or each
    authors'-format file's size and sha256. None for the synthetic data (its config and the
    seed define it)."""
    name = config_lib.dataset_name(config)
    if name == "synthetic":
        return None
    if name == "authors_text":
        return {k: _file_identity(v) for k, v in config_lib.text_files(config).items()}
    return datasets.content(datasets.build_fingerprint(
        name, config.data.data_dir or None, config.data.tfds_dir or None))


def _file_identity(path: str) -> list | None:
    """A file's content: ``[bytes, sha256]`` (None for no file). Content, not path and
    mtime: an edited file with the old size and time is still a different file."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected lines {authors_format.FIELDS})")
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return [size, digest.hexdigest()]


def _row(model_name: str, method: str, config, test: dict, val: dict, **extra) -> dict:
    select = config.train.select_metric
    return {
        "model": model_name,
        "method": method,
        **{k: test[k] for k in METRIC_NAMES},
        "seed": config.seed,
        "dataset": config.data.name,
        f"val_{select}": val[select],
        **extra,
    }


def run_finetune(model, base_params: dict, data: Splits, config, run_dir: str) -> dict:
    """The fine-tuning baseline as a JSON-able dict (plus ``test_logits [N_test]``).

    Stored in ``run_dir/result.json`` (test logits beside it in ``test_logits.npy``) and
    reused when the same Base parameters, data and fine-tuning config come again."""
    ft_config = config_lib.finetune_config(config)
    identity = {
        "finetune": {k: v for k, v in dataclasses.asdict(ft_config).items() if k != "progress"},
        "base_params": cache.arrays_digest(base_params),
        "data": data.fingerprint(),
        "model": model.name,
        # 0 steps reuses Base's predictions, which are exact only at Base's batch size
        "eval_batch_size": config.train.eval_batch_size,
        "metrics_version": METRICS_VERSION,  # hr@K changed meaning in version 2
    }
    path = os.path.join(run_dir, "result.json")
    logits_path = os.path.join(run_dir, "test_logits.npy")
    stored = cache.load_record(path, identity)
    if stored is not None and stored.get("test_logits_sha256") and os.path.isfile(logits_path):
        test_logits = np.load(logits_path)
        if cache.arrays_digest(test_logits) == stored["test_logits_sha256"]:
            return {**stored, "test_logits": test_logits}
    # each learning rate's validation logits are kept beside, so an interrupted run resumes
    result = finetune.finetune_and_evaluate(model, base_params, data, ft_config,
                                            eval_batch_size=config.train.eval_batch_size,
                                            store=(run_dir, identity))
    out = dataclasses.asdict(result)
    test_logits = np.asarray(out.pop("test_logits"), np.float32)
    out["test_logits_sha256"] = cache.arrays_digest(test_logits)
    with files.atomic_file(logits_path, "wb") as f:
        np.save(f, test_logits)
    cache.save_record(path, identity, out)  # last: it vouches for the logits file
    finetune.remove_parts(run_dir)  # the test stage's parts: its logits are stored whole
    return {**out, "test_logits": test_logits}


def duet_variant(config: ml_collections.ConfigDict, model, name: str) -> tuple[Duet, str]:
    """The :class:`Duet` of DUET method ``name`` and its training mode."""
    options = config_lib.duet_options(config, name)
    return Duet.create(model, **options.generator_kwargs()), options.training


def build_method(config: ml_collections.ConfigDict, model, name: str,
                 base_params: dict | None = None):
    """The trainable :class:`~duet_jax.methods.Method` of ``name`` with its generator options
    from the config (a DUET variant's own, or, for a control sized like DUET such as
    ``base_wide``, those of the DUET method it is matched to)."""
    spec = method_spec(name)
    options = {}
    if spec.uses_generator:
        duet_options = config_lib.duet_options(config, name)
        options = {"training": duet_options.training, **duet_options.generator_kwargs()}
    elif spec.generator_of:
        options = config_lib.duet_options(config, spec.generator_of).generator_kwargs()
    return get_method(name, model, base_params=base_params, **options)


def reads_trigger(name: str) -> bool:
    """Whether trained method ``name`` reads ``trigger_seq`` (so a stale trigger matters)."""
    spec = method_spec(name)
    return spec.uses_generator or spec.generator_of is not None


def train_method(
    config: ml_collections.ConfigDict,
    data: Splits,
    model,
    name: str,
    run_dir: str,
    base_params: dict | None = None,
    identity: dict | None = None,
) -> TrainResult:
    """Train (or resume, or only restore) trained method ``name`` in ``run_dir``, built by
    the method registry (:func:`duet_jax.methods.get_method`).

    ``identity`` (default :func:`experiments.config.run_identity`) is what must match on
    resume; a DUET variant adds the generator options it really uses, and a two-stage one
    the digest of the ``base_params`` it starts from.
    """
    run_config = dict(config_lib.run_identity(config) if identity is None else identity)
    method = build_method(config, model, name, base_params)
    spec = method_spec(name)
    run_defaults = None
    if spec.uses_generator or spec.generator_of:
        duet_options = config_lib.duet_options(config, spec.generator_of or name)
        run_config["generator"] = dataclasses.asdict(duet_options)
        # a generator option added after a run started resumes it at its default value
        run_defaults = {"generator": dataclasses.asdict(DuetOptions())}
        if spec.uses_generator and duet_options.training == "two_stage":
            run_config["base_params"] = cache.arrays_digest(base_params)
    logging.info("training %s/%s in %s", model.name, name, run_dir)
    return train_and_evaluate(
        method,
        data,
        config_lib.train_config(config),
        run_dir,
        seed=config.seed,
        run_config=run_config,
        name=f"{model.name}/{name}",
        run_defaults=run_defaults,
    )


def needs_base(config: ml_collections.ConfigDict, names: list[str]) -> bool:
    """Whether a method in ``names`` starts from Base's parameters (on-device adaptation,
    two-stage DUET)."""
    for name in names:
        spec = method_spec(name)
        if spec.kind == "on_device":
            return True
        if spec.uses_generator and config_lib.duet_options(config, name).training == "two_stage":
            return True
    return False


def run(config: ml_collections.ConfigDict, workdir: str, data: Splits | None = None) -> list[dict]:
    """Train and evaluate every method in ``config.methods`` for ``config.model``; one row
    per method for results.json.

    Each method's run checkpoints under ``workdir/<method>`` and resumes from there when the
    same command runs again (a workdir holds one model's experiment). ``finetune`` and
    two-stage DUET variants need Base's parameters, so Base is trained first (and reported)
    whenever one of them is asked for.
    """
    config_lib.validate(config)
    data = load_data(config, workdir) if data is None else data
    model = get_model(config_lib.model_name(config),
                      config_lib.model_config(config, data.num_items))
    names = run_order(config, list(config_lib.methods(config)))
    group_size = config_lib.finetune_config(config).group_size
    # the device-test set under each extra trigger variant, built once for every method
    variants = {variant: with_trigger(data, "test", mode=mode, lag=lag)
                for variant, mode, lag in config_lib.sample_config(config).trigger_variants()}
    rows, base_params, trained = [], None, {}
    for name in names:
        run_dir = os.path.join(workdir, name)
        spec = method_spec(name)
        if spec.kind == "test_time":  # scores a trained DUET another way; trains nothing
            duet = duet_variant(config, model, spec.evaluates)[0]
            score = {split: metrics_lib.evaluate(
                getattr(data, split).user, getattr(data, split).label,
                score_at_test_time(name, duet, trained[spec.evaluates], getattr(data, split),
                                   reference=data.train, seed=config.seed,
                                   batch_size=config.train.eval_batch_size))
                for split in ("val", "test")}
            rows.append(_row(model.name, name, config, score["test"], score["val"]))
            continue
        if spec.kind == "on_device":  # adapts Base on each device; nothing to train
            logging.info("fine-tuning %s on each device in %s", model.name, run_dir)
            ft = run_finetune(model, base_params, data, config, run_dir)
            rows.append(_row(model.name, name, config, ft["test"], ft["val"],
                             finetune_learning_rate=ft["learning_rate"],
                             finetune_steps=ft["steps"],
                             adapt_ms_per_device=1e3 * ft["seconds_per_device"]))
            continue
        result = train_method(config, data, model, name, run_dir, base_params)
        extra = {}
        if name == "base":
            base_params = result.params
        elif spec.uses_generator:
            extra["adapt_ms_per_device"] = 1e3 * adaptation.generation_seconds_per_device(
                duet_variant(config, model, name)[0], result.params, data.test,
                data.num_users, group_size,
            )
        trained[name] = result.params
        rows.append(_row(model.name, name, config, result.test, result.val,
                         best_epoch=result.best_epoch, train_steps=result.steps,
                         train_seconds=round(result.train_seconds, 2), **extra))
        if variants and reads_trigger(name):  # the deployment protocol's other triggers
            logits_fn = jax.jit(build_method(config, model, name, base_params).logits)
            for variant, test in variants.items():
                scores = metrics_lib.evaluate(test.user, test.label, predict(
                    logits_fn, result.params, test, config.train.eval_batch_size))
                rows.append(_row(model.name, f"{name}@{variant}", config, scores,
                                 result.val, trigger=variant))
    return rows


def run_order(config: ml_collections.ConfigDict, names: list[str]) -> list[str]:
    """``names`` with what others start from first: Base before fine-tuning and two-stage
    DUET, and the DUET method a test-time control scores before that control."""
    if needs_base(config, names):
        names = ["base", *(n for n in names if n != "base")]
    for name in list(names):
        target = method_spec(name).evaluates
        if target and target not in names[: names.index(name)]:
            names = [n for n in names if n != target]
            names.insert(names.index(name), target)
    return names
