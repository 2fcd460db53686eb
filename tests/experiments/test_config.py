import ml_collections
import pytest

from duet_jax.errors import ConfigError
from experiments import config as config_lib
from experiments.configs import synthetic


def _with(path, value):
    config = synthetic.get_config()
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    return config


def test_default_config_is_valid():
    config_lib.validate(synthetic.get_config())


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("model", "bert4rec", "config.model"),
        ("seq_len", 0, "config.seq_len"),
        ("train.learning_rate", -1e-3, "config.train.learning_rate"),
        ("train.learning_rate", 0.0, "config.train.learning_rate"),
        ("train.batch_size", 0, "config.train.batch_size"),
        ("train.select_metric", "accuracy", "config.train.select_metric"),
        ("methods", "base,magic", "config.methods"),
        ("methods", "", "config.methods"),
        ("embed_dim", 30, "config.sasrec.num_heads"),  # 30 is not divisible by 4 heads
        ("generator.decoders", "sometimes", "config.generator.decoders"),
        ("generator.decoder_init", "zeros", "config.generator.decoder_init"),
        ("data.name", "netflix", "config.data.name"),
        ("data.num_negatives", -1, "config.data.num_negatives"),
        ("data.drift", 2.0, "config.data.drift"),
        ("data.cloud_len", (40, 30), "config.data.cloud_len"),
        ("seed", -1, "config.seed"),
        ("data.cloud_len", (30,), "config.data.cloud_len"),
        ("generator.z_dim", 0, "config.generator.z_dim"),
    ],
)
def test_bad_field_raises_error_naming_it(path, value, field):
    config = _with(path, value)
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config)
    assert info.value.field == field
    assert field in str(info.value) and "expected" in str(info.value)


def test_unknown_data_field_is_named():
    config = synthetic.get_config()
    config.data.num_userz = 5
    with pytest.raises(ConfigError, match=r"config\.data\.num_userz"):
        config_lib.validate(config)


def test_run_identity_ignores_cosmetic_fields():
    a = synthetic.get_config()
    b = synthetic.get_config()
    b.train.progress = False
    b.methods = "duet"
    assert config_lib.run_identity(a) == config_lib.run_identity(b)
    b.sasrec.num_heads = 2  # another model's options: not part of this model's run
    b.model = "gru4rec"
    a.model = "gru4rec"
    assert config_lib.run_identity(a) == config_lib.run_identity(b)
    b.embed_dim = 16
    assert config_lib.run_identity(a) != config_lib.run_identity(b)
    # config.train is compared by duet_jax.training (a larger budget may resume)
    assert "train" not in config_lib.run_identity(a)


def test_frozen_decoders_default_to_the_authors_init_and_refuse_glorot():
    config = _with("generator.decoders", "frozen")
    config_lib.validate(config)  # decoder_init="auto" picks fmod_normal
    config.generator.decoder_init = "glorot"
    with pytest.raises(ConfigError, match="biases would stay zero"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "group,field,value,expected",
    [
        ("train", "batch_size", "64", "an integer"),
        ("train", "progress", 1, "True or False"),
        ("data", "drift", "high", "a number"),
    ],
)
def test_wrongly_typed_field_is_named(group, field, value, expected):
    """ml_collections blocks type changes on the command line; a config built from a plain
    dict can still carry them."""
    config = synthetic.get_config()
    values = config[group].to_dict()
    values[field] = value
    config[group] = ml_collections.ConfigDict(values)
    with pytest.raises(ConfigError, match=f"config.{group}.{field}=.*expected {expected}"):
        config_lib.validate(config)


@pytest.mark.parametrize("name", config_lib.REAL_DATASETS)
def test_every_dataset_config_is_valid_and_names_its_dataset(name):
    import importlib

    module = importlib.import_module(f"experiments.configs.{name}")
    for variant in ("", "quick"):
        config = module.get_config(variant)
        config_lib.validate(config)
        assert config.data.name == name
    assert module.get_config("quick").train.num_epochs < module.get_config().train.num_epochs


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("data.user_core", -1, "config.data.user_core"),
        ("data.min_rating", -2, "config.data.min_rating"),
        ("data.val_frac", 0.0, "config.data.val_frac"),
        ("data.test_frac", 0.95, "config.data.test_frac"),  # val_frac + test_frac >= 1
        ("data.val_frac", 1.0, "config.data.val_frac"),
    ],
)
def test_bad_protocol_field_raises_error_naming_it(path, value, field):
    from experiments.configs import movielens_100k

    config = movielens_100k.get_config()
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config)
    assert info.value.field == field


def test_authors_text_config_needs_its_files():
    from experiments.configs import authors_text

    config = authors_text.get_config()
    with pytest.raises(ConfigError, match=r"config\.data\.train_file=''"):
        config_lib.validate(config)
    config.data.train_file = config.data.test_file = "x.txt"
    config_lib.validate(config)
