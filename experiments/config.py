"""From an experiment's ``ml_collections`` config to the typed configs the library uses.

Every bad value raises :class:`ConfigError` naming the field as it is written on the
command line (``config.train.learning_rate``), before any data is prepared.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import ml_collections

from duet_jax.data.protocol import ProtocolConfig
from duet_jax.data.samples import SampleConfig
from duet_jax.data.synthetic import SyntheticConfig
from duet_jax.data.tfds_builders import BUILDERS
from duet_jax.errors import ConfigError
from duet_jax.finetune import FinetuneConfig
from duet_jax.methods import DuetOptions, method_names, method_spec
from duet_jax.models import MODELS, ModelConfig
from duet_jax.training import TrainConfig

REAL_DATASETS = tuple(BUILDERS)  # built with TFDS from raw files
DATASETS = ("synthetic", "authors_text", *REAL_DATASETS)
# config.data fields that shape samples rather than the dataset itself
SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig) if f.name != "seq_len")
PROTOCOL_FIELDS = tuple(f.name for f in dataclasses.fields(ProtocolConfig))
# config.data fields that say where files are (strings; "" = the default place)
REAL_SOURCE_FIELDS = ("data_dir", "tfds_dir")
TEXT_FIELDS = ("train_file", "val_file", "test_file")


def _type_error(default: Any, value: Any) -> str | None:
    """What ``value`` should be, judged by the field's default, or None if it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple):
        return None if isinstance(value, tuple | list) else "a tuple"
    return None


def _build(cls, field_paths: dict[str, str], **kwargs):
    """``cls(**kwargs)``, re-raising its ConfigError under the experiment-config field name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in kwargs.items():
        path = field_paths.get(name, name)
        if name not in fields:
            raise ConfigError(path, value, f"no such field; known: {sorted(fields)}")
        default = fields[name].default
        expected = None if default is dataclasses.MISSING else _type_error(default, value)
        if expected:
            raise ConfigError(path, value, expected)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        name = err.field.rsplit(".", 1)[-1]
        raise ConfigError(field_paths.get(name, err.field), err.value, err.expected) from None


def _int(config: ml_collections.ConfigDict, path: str, low: int) -> int:
    value = config
    for part in path.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.{path}", value, f"an integer >= {low}")
    return value


def model_name(config: ml_collections.ConfigDict) -> str:
    if config.model not in MODELS:
        raise ConfigError("config.model", config.model, f"one of {sorted(MODELS)}")
    return config.model


def methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = tuple(m.strip() for m in str(config.methods).split(",") if m.strip())
    known = method_names()
    if not names or any(m not in known for m in names) or len(set(names)) != len(names):
        raise ConfigError(
            "config.methods",
            config.methods,
            f"a comma-separated list of distinct names from {list(known)}",
        )
    return names


def model_config(config: ml_collections.ConfigDict, num_items: int) -> ModelConfig:
    paths = {
        "seq_len": "config.seq_len",
        "embed_dim": "config.embed_dim",
        "num_heads": "config.sasrec.num_heads",
        "ffn_mult": "config.sasrec.ffn_mult",
        "mask_padding": "config.sasrec.mask_padding",
        "din_hidden": "config.din.hidden",
        "num_items": "data (number of items)",
    }
    _int(config, "seq_len", 1)
    _int(config, "embed_dim", 1)
    return _build(
        ModelConfig,
        paths,
        num_items=num_items,
        seq_len=config.seq_len,
        embed_dim=config.embed_dim,
        num_heads=config.sasrec.num_heads,
        ffn_mult=config.sasrec.ffn_mult,
        mask_padding=bool(config.sasrec.mask_padding),
        din_hidden=tuple(config.din.hidden),
    )


def duet_options(config: ml_collections.ConfigDict, method: str = "duet") -> DuetOptions:
    """The generator options and training mode of DUET method ``method``:
    ``config.generator`` with the registry's overrides for that method (values
    ``"ablation.X"`` read from ``config.ablation.X``, which must switch the option on: an
    integer >= 1)."""
    options = {name: config.generator[name] for name in GENERATOR_FIELDS}
    overrides = method_spec(method).generator or {}
    paths = {name: f"config.generator.{name}" for name in GENERATOR_FIELDS}
    for name, value in overrides.items():
        if isinstance(value, str) and value.startswith("ablation."):
            field = value.split(".", 1)[1]
            value = config.ablation[field]
            paths[name] = f"config.ablation.{field}"
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(paths[name], value,
                                  f"an integer >= 1 (method {method} switches it on)")
        options[name] = value
    return _build(DuetOptions, paths, **options)


GENERATOR_FIELDS = tuple(f.name for f in dataclasses.fields(DuetOptions))


def generator_options(config: ml_collections.ConfigDict) -> dict:
    """``config.generator`` checked: keyword arguments for :meth:`duet_jax.duet.Duet.create`
    plus ``training``."""
    return dataclasses.asdict(duet_options(config, "duet"))


def method_options(config: ml_collections.ConfigDict, method: str) -> dict:
    """:func:`duet_options` of ``method`` as a dict (what a run's identity records)."""
    return dataclasses.asdict(duet_options(config, method))


def finetune_config(config: ml_collections.ConfigDict) -> FinetuneConfig:
    fields = dict(config.finetune)
    for name in ("steps", "learning_rates"):
        if isinstance(fields.get(name), list | tuple):
            fields[name] = tuple(fields[name])
    fields["select_metric"] = config.train.select_metric
    fields["progress"] = bool(config.train.progress)
    fields["seed"] = config.seed  # of the selection stage's device sample
    paths = {k: f"config.finetune.{k}" for k in fields}
    paths["select_metric"] = "config.train.select_metric"
    paths["seed"] = "config.seed"
    return _build(FinetuneConfig, paths, **fields)


def sample_config(config: ml_collections.ConfigDict) -> SampleConfig:
    paths = {name: f"config.data.{name}" for name in SAMPLE_FIELDS}
    paths["seq_len"] = "config.seq_len"
    return _build(
        SampleConfig,
        paths,
        seq_len=config.seq_len,
        **{name: config.data[name] for name in SAMPLE_FIELDS},
    )


def dataset_name(config: ml_collections.ConfigDict) -> str:
    if config.data.name not in DATASETS:
        raise ConfigError("config.data.name", config.data.name, f"one of {list(DATASETS)}")
    return config.data.name


def _string(config: ml_collections.ConfigDict, name: str) -> str:
    value = config.data.get(name)
    if not isinstance(value, str):
        raise ConfigError(f"config.data.{name}", value, "a string (a path, or '' for the default)")
    return value


def protocol_config(config: ml_collections.ConfigDict) -> ProtocolConfig:
    """How a real dataset's records become sequences (docs/datasets.md, "Protocol")."""
    for name in REAL_SOURCE_FIELDS:
        _string(config, name)
    missing = [n for n in PROTOCOL_FIELDS if n not in config.data]
    if missing:
        raise ConfigError(f"config.data.{missing[0]}", None, "a value (the field is missing)")
    return _build(
        ProtocolConfig,
        {n: f"config.data.{n}" for n in PROTOCOL_FIELDS},
        **{n: config.data[n] for n in PROTOCOL_FIELDS},
    )


def text_files(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The authors'-format files; ``val_file`` may be '' (held out from train)."""
    files = {name: _string(config, name) for name in TEXT_FIELDS}
    for name in ("train_file", "test_file"):
        if not files[name]:
            raise ConfigError(f"config.data.{name}", files[name], "the path of a text file")
    val_frac = config.data.get("val_frac")
    if isinstance(val_frac, bool) or not isinstance(val_frac, int | float) or not (
        0.0 < val_frac < 1.0
    ):
        raise ConfigError("config.data.val_frac", val_frac, "a number in (0, 1)")
    return files


def synthetic_config(config: ml_collections.ConfigDict) -> SyntheticConfig:
    fields = {k: v for k, v in config.data.items() if k not in (*SAMPLE_FIELDS, "name", "seed")}
    fields = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in fields.items()}
    return _build(SyntheticConfig, {k: f"config.data.{k}" for k in fields}, **fields)


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    train = dict(config.train)
    lr = train.get("learning_rate")
    if isinstance(lr, int | float) and not isinstance(lr, bool):
        train["learning_rate"] = float(lr)
    return _build(TrainConfig, {k: f"config.train.{k}" for k in train}, **train)


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every field; raises :class:`ConfigError` naming the first bad one."""
    model_name(config)
    methods(config)
    _int(config, "seed", 0)
    _int(config, "data.seed", 0)
    model_config(config, num_items=1)
    duet_options(config, "duet")
    for name in methods(config):
        if method_spec(name).uses_generator:
            duet_options(config, name)
    finetune_config(config)  # its group size also times DUET's adaptation
    sample_config(config)
    name = dataset_name(config)
    if name == "synthetic":
        synthetic_config(config)
    elif name == "authors_text":
        text_files(config)
        if sample_config(config).needs_history:
            field = next(f for f in ("train_lags", "eval_lags", "eval_once")
                         if config.data[f] != getattr(SampleConfig(), f))
            raise ConfigError(f"config.data.{field}", config.data[field],
                              "its default: the authors' text format keeps no full user "
                              "sequences, so triggers cannot be rebuilt at another lag")
    else:
        protocol_config(config)
    train_config(config)


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields that define one (model, method) training run, as JSON-able values.

    File locations and the list of methods are left out, so rerunning with another method
    list or with the raw files moved still resumes (the data fingerprint still has to
    match); ``config.train`` and the seed are compared by :mod:`duet_jax.training`, which
    lets a run continue with a larger budget. So are the generator,
    ablation and fine-tuning fields: each method adds the options it really uses
    (:func:`method_options`), so a Base run resumes whatever the generator settings.
    """
    as_dict = config.to_dict()
    # training compares config.train and the seed itself (resuming with a larger budget is
    # allowed there), and another model's options cannot change this model's run
    for name in ("methods", "generator", "ablation", "finetune", "train", "seed",
                 *({"sasrec", "din"} - {config.model})):
        as_dict.pop(name, None)
    for name in SampleConfig.EVAL_FIELDS:  # which evaluations to add: no retraining
        as_dict.get("data", {}).pop(name, None)
    for name in REAL_SOURCE_FIELDS:  # where files are; the data fingerprint guards content
        as_dict.get("data", {}).pop(name, None)

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(as_dict)


def parse_value(text: str):
    """A Python literal (``4``, ``1e-3``, ``(1, 5)``, ``True``) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``--set`` overrides ``field.path=value`` (a Python literal or a string); an
    unknown field or a value of the wrong type raises :class:`ConfigError` naming it."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "FIELD=VALUE, e.g. train.num_epochs=4")
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or not hasattr(node, "get") or leaf not in node:
            raise ConfigError(f"--set {path}", text, "a field of the config (no such field)")
        try:
            setattr(node, leaf, parse_value(text))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.{path}", text, str(err)) from None
