import pytest

from bigbatch.config import Config, load_config, parse_override, validate_against_data
from bigbatch.errors import ConfigError


def test_defaults_are_a_valid_config():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optimizer.name == "sgd" and cfg.train.batch_size == 128


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optimizer]\nlr = 0.1\n[schedule]\ndecay_epochs = [71]\n[run]\nname = "x"\n')
    cfg = load_config(path, ["optimizer.lr=0.01", "train.batch_size=2048", "optimizer.name=kfac", "kfac.pi_damping=false"])
    assert cfg.optimizer.lr == 0.01
    assert cfg.train.batch_size == 2048
    assert cfg.optimizer.name == "kfac"
    assert cfg.kfac.pi_damping is False
    assert cfg.schedule.decay_epochs == [71]
    assert cfg.run.name == "x"


def test_int_accepted_for_float():
    cfg = load_config(None, ["optimizer.lr=1"])
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1.0


@pytest.mark.parametrize(
    "override, words",
    [
        ("optimizer.learning_rate=0.1", ["unknown config key 'optimizer.learning_rate'", "optimizer"]),
        ("train.batchsize=12", ["unknown config key 'train.batchsize'", "did you mean 'batch_size'"]),
        ("trian.batch_size=12", ["unknown config section '[trian]'", "did you mean 'train'"]),
        ("optimizer.lr=-0.1", ["optimizer.lr", "must be > 0"]),
        ("train.batch_size=0", ["train.batch_size", ">= 1"]),
        ("augment.mixup_alpha=-1", ["augment.mixup_alpha", "0 to disable"]),
        ("data.format=imagenet", ["data.format", "choose one of"]),
        ("model.name=lenet", ["model.name", "did you mean 'lenet5'"]),
        ("optimizer.name=adam", ["optimizer.name", "sgd, kfac"]),
        ("train.batch_size=abc", ["train.batch_size", "must be an integer"]),
        ("kfac.damping=0", ["kfac.damping", "> 0"]),
        ("schedule.decay_epochs=71", ["schedule.decay_epochs", "must be a list"]),
        ("optimizer.lr", ["section.key=value"]),
    ],
)
def test_bad_values_are_named(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_batch_size_larger_than_training_set():
    cfg = load_config(None, ["train.batch_size=2048"])
    with pytest.raises(ConfigError, match="training set has only 1000 examples"):
        validate_against_data(cfg, num_train=1000, num_test=100)
    validate_against_data(cfg, num_train=50000, num_test=100)


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_override_values_parse_as_toml():
    assert parse_override("a.b=[1, 2]") == ("a", "b", [1, 2])
    assert parse_override("a.b=true") == ("a", "b", True)
    assert parse_override("a.b=some/path.zip") == ("a", "b", "some/path.zip")
