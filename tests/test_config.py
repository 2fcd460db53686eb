import pytest

from duet_jax import config as config_lib
from duet_jax.errors import ConfigError
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
    b.train.learning_rate = 2e-3
    assert config_lib.run_identity(a) != config_lib.run_identity(b)
