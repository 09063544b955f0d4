import pytest

from bigbatch.config import (
    Config,
    config_from_dict,
    load_config,
    parse_override,
    read_run_config,
    validate_against_data,
)
from bigbatch.errors import ConfigError


def test_defaults_are_a_valid_config():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optimizer.name == "sgd" and cfg.train.batch_size == 128


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optimizer]\nlr = 0.1\n[schedule]\ndecay_epochs = [71]\n[run]\nname = "x"\n')
    cfg = load_config(
        path,
        [
            "optimizer.lr=0.01",
            "train.batch_size=2048",
            "optimizer.name=kfac",
            "kfac.pi_damping=false",
        ],
    )
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
        (
            "optimizer.learning_rate=0.1",
            ["unknown config key 'optimizer.learning_rate'", "optimizer"],
        ),
        (
            "train.batchsize=12",
            ["unknown config key 'train.batchsize'", "did you mean 'batch_size'"],
        ),
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


def test_runtime_keys_live_in_their_own_section():
    cfg = load_config(None, ["runtime.device=cpu", "runtime.threads=1", "runtime.progress=off"])
    assert (cfg.runtime.device, cfg.runtime.threads, cfg.runtime.progress) == ("cpu", 1, "off")
    assert "runtime" not in cfg.experiment() and "optimizer" in cfg.experiment()
    with pytest.raises(ConfigError, match="'run.device' is now 'runtime.device'"):
        load_config(None, ["run.device=cpu"])


def test_stored_configs_of_the_old_layout_still_load():
    old = {
        "run": {"name": "r", "output_dir": "elsewhere", "threads": 2, "retain_memory": False},
        "train": {"batch_size": 64, "progress": "off"},
        "data": {"cache_dir": "c"},
    }
    cfg = config_from_dict(old, stored=True)
    assert cfg.runtime.output_dir == "elsewhere" and cfg.runtime.threads == 2
    assert (
        cfg.runtime.progress == "off"
        and cfg.runtime.cache_dir == "c"
        and cfg.train.batch_size == 64
    )


def test_run_configs_are_read_back_or_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="not a bigbatch run directory \\(no config.json\\)"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text('{"optimizer": {"lr": 0.5}}')
    assert read_run_config(tmp_path).optimizer.lr == 0.5
    for damaged in ('{"optimizer": {"lr"', "[1, 2]", '{"optimizer": {"lr": "fast"}}'):
        (tmp_path / "config.json").write_text(damaged)
        with pytest.raises(ConfigError, match="config.json' is not a bigbatch run config"):
            read_run_config(tmp_path)


def test_data_path_has_no_machine_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config()
    assert cfg.data.path == "" and cfg.runtime.cache_dir == str(tmp_path / "bigbatch")


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\b", "x" * 129, ""])
def test_run_names_stay_inside_the_output_dir(name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [f'run.name="{name}"'.replace("\\", "\\\\")])


def test_include_lies_beneath_the_including_file(tmp_path):
    (tmp_path / "base.toml").write_text(
        "[optimizer]\nlr = 0.1\nmomentum = 0.5\n[schedule]\ndecay_epochs = [3, 5]\n"
    )
    (tmp_path / "top.toml").write_text(
        'include = "base.toml"\n[optimizer]\nlr = 0.2\n[schedule]\ndecay_epochs = [4]\n'
    )
    cfg = load_config(tmp_path / "top.toml")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.schedule.decay_epochs) == (0.2, 0.5, [4])
    (tmp_path / "loop.toml").write_text('include = "loop.toml"\n')
    with pytest.raises(ConfigError, match="includes it again"):
        load_config(tmp_path / "loop.toml")


def test_kfac_validation_is_shared_with_the_preconditioner():
    from torch import nn

    from bigbatch.optim.kfac import KFACPreconditioner

    with pytest.raises(ConfigError, match="kfac.stats_fraction.*must be in"):
        load_config(None, ["kfac.stats_fraction=0"])
    with pytest.raises(ValueError, match="stats_fraction.*must be in"):
        KFACPreconditioner(nn.Linear(2, 2), stats_fraction=0)


def test_crop_padding_is_bounded_by_the_image():
    cfg = load_config(None, ["augment.crop_padding=1000000"])
    with pytest.raises(ConfigError, match="augment.crop_padding.*images are 32x32.*at most 32"):
        validate_against_data(cfg, num_train=1000, num_test=100, image_size=(32, 32))
    validate_against_data(load_config(None, ["augment.crop_padding=32"]), 1000, 100, 1, (32, 32))


def test_inverse_interval_below_factor_interval_warns():
    with pytest.warns(UserWarning, match="kfac.inverse_interval .5. is smaller than"):
        load_config(None, ["kfac.factor_interval=10", "kfac.inverse_interval=5"])


@pytest.mark.parametrize("key", ["optimizer.lr", "augment.mixup_alpha", "runtime.dist_timeout"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_relative_data_path_is_stored_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ['data.path="data/cifar.zip"'])
    assert cfg.data.path == str(tmp_path / "data" / "cifar.zip")
    assert config_from_dict(cfg.to_dict(), stored=True).data.path == cfg.data.path
    assert load_config(None, ['data.path=""']).data.path == ""  # empty: CIFAR-10 in the cache
