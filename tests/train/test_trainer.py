"""The Trainer (train/trainer.py): determinism, the run directory, resume, divergence, kills."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bigbatch.cli import main as cli_main
from bigbatch.config import load_config
from bigbatch.errors import ConfigError, TrainingError
from bigbatch.io import read_jsonl
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.hardware import cpu_model
from bigbatch.train.trainer import Trainer


def _overrides(tmp_path, *overrides):
    return [
        "data.format=synthetic",
        f"runtime.output_dir={tmp_path}",
        "run.name=t",
        "run.epochs=3",
        "train.batch_size=64",
        "runtime.progress=off",
        "train.train_eval_examples=200",
        "optimizer.lr=0.05",
        *overrides,
    ]


def _cfg(tmp_path, *overrides):
    return load_config(None, _overrides(tmp_path, *overrides))


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def _strip_times(rows):
    return [
        {
            k: v
            for k, v in r.items()
            if "time" not in k and k not in ("images_per_sec", "max_rss_mib")
        }
        for r in rows
    ]


def test_same_seed_same_metrics(tmp_path, synthetic):
    a = Trainer(
        _cfg(tmp_path / "a", "augment.crop_flip=true", "augment.mixup_alpha=0.5"), synthetic
    ).fit()
    b = Trainer(
        _cfg(tmp_path / "b", "augment.crop_flip=true", "augment.mixup_alpha=0.5"), synthetic
    ).fit()
    assert _strip_times(a) == _strip_times(b)
    c = Trainer(_cfg(tmp_path / "c", "run.seed=1", "augment.mixup_alpha=0.5"), synthetic).fit()
    assert _strip_times(a) != _strip_times(c)


def test_run_directory_contents(tmp_path, synthetic):
    umask = os.umask(0o027)  # files must follow the user's umask, not mkstemp's private 0600
    try:
        # The command, not the Trainer alone: it also draws the curves.
        sets = _overrides(
            tmp_path, "data.train_limit=600", "data.test_limit=200", "runtime.device=cpu"
        )
        assert cli_main(["train", *(a for o in sets for a in ("--set", o))]) == 0
    finally:
        os.umask(umask)
    run = tmp_path / "t"
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 64
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["step"] == 3 * 10  # ceil(600 / 64) updates per epoch
    for key in (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "train_eval_acc",
        "epoch_time",
        "images_per_sec",
        "lr",
    ):
        assert key in rows[0]
    with open("/proc/cpuinfo") as f:  # the CPU model Linux reports, read independently
        lines = [line for line in f if line.startswith("model name")]
    model = lines[0].split(":", 1)[1].strip() if lines else cpu_model()  # aarch64 has none
    assert {r["hardware"] for r in rows} == {
        f"{model}, {torch.get_num_threads()} of {len(os.sched_getaffinity(0))} cores"
    }
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("augment.mixup_alpha=0.7", "augment.crop_flip=true", "schedule.decay_epochs=[2]"),
        (
            "optimizer.name=kfac",
            "kfac.factor_interval=2",
            "kfac.inverse_interval=3",
            "kfac.fisher_type=mc",
            "schedule.warmup_epochs=1",
        ),
        (
            "optimizer.name=kfac",
            "kfac.adaptive_damping=true",
            "kfac.adaptive_interval=2",
            "augment.mixup_alpha=0.5",
        ),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, synthetic, extra):
    full = Trainer(_cfg(tmp_path / "full", *extra), synthetic)
    full_rows = full.fit()
    part = Trainer(_cfg(tmp_path / "part", "run.epochs=1", *extra), synthetic)
    part.fit()
    resumed = Trainer(_cfg(tmp_path / "part", *extra), synthetic)
    rows = resumed.fit(resume=True)
    assert _strip_times(rows) == _strip_times(full_rows)
    for a, b in zip(_params(resumed), _params(full)):
        assert torch.equal(a, b)
    if "kfac.adaptive_damping=true" in extra:  # the damping moved, and the resume carried it
        assert (
            rows[0]["kfac_damping"] != 1e-2 and rows[1]["kfac_damping"] != rows[0]["kfac_damping"]
        )
        # rho may be negative (a step that raised the batch's loss): finite is what holds.
        assert all(math.isfinite(r["kfac_reduction_ratio"]) for r in rows)


def test_existing_run_needs_resume_or_overwrite(tmp_path, synthetic):
    Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit()
    Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit(overwrite=True)
    with pytest.raises(TrainingError, match="config changed.*optimizer.lr"):
        Trainer(_cfg(tmp_path, "run.epochs=2", "optimizer.lr=0.1"), synthetic).fit(resume=True)
    # Runtime keys never change results, so a resume may change any of them (and extend the run).
    runtime = ["runtime.eval_batch_size=50", "runtime.checkpoint_every=2", "runtime.threads=1"]
    rows = Trainer(_cfg(tmp_path, "run.epochs=2", *runtime), synthetic).fit(resume=True)
    assert [r["epoch"] for r in rows] == [1, 2]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, synthetic):
    Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit()
    before = load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    trainer = Trainer(_cfg(tmp_path, "run.epochs=3"), synthetic)
    original_step = trainer.optimizer.step

    def poisoned_step(*args, **kwargs):  # a real divergence: parameters become inf
        original_step(*args, **kwargs)
        with torch.no_grad():
            trainer.model.fc3.weight.fill_(float("inf"))

    trainer.optimizer.step = poisoned_step
    stopped = "train_loss is (nan|inf) after epoch 2.*last good checkpoint"
    with pytest.raises(TrainingError, match=stopped):
        trainer.fit(resume=True)
    after = load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    assert after["epoch"] == 1
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k])


def test_finite_divergence_stops_and_a_resume_may_change_the_lr(tmp_path, synthetic):
    # The case: K-FAC with damping far below float32 resolution at batch 32 reaches
    # losses of 1e13 that are all finite.
    kfac = ['optimizer.name="kfac"', "kfac.damping=1e-12", "train.batch_size=32"]
    diverged = r"train_loss .* above 23, .* diverged; no checkpoint"
    warned = pytest.warns(UserWarning, match="below the torch.float32 resolution")
    with pytest.raises(TrainingError, match=diverged), warned:
        Trainer(_cfg(tmp_path / "kfac", "run.epochs=1", *kfac), synthetic).fit()
    Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit()
    good = load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    huge = _cfg(tmp_path, "run.epochs=2", "optimizer.lr=30")
    with pytest.raises(TrainingError, match="config changed.*--allow-change optimizer.lr"):
        Trainer(huge, synthetic).fit(resume=True)
    with pytest.raises(TrainingError, match=r"diverged; the last good checkpoint.*--allow-change"):
        Trainer(huge, synthetic).fit(resume=True, allow_change=("optimizer.lr",))
    kept = load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    assert kept["epoch"] == 1
    assert all(torch.equal(v, kept["model"][k]) for k, v in good["model"].items())
    assert [r["epoch"] for r in read_jsonl(tmp_path / "t" / "metrics.jsonl")] == [1]
    # The advice works: a lower rate, recorded in the row of the first resumed epoch.
    rows = Trainer(_cfg(tmp_path, "run.epochs=2", "optimizer.lr=0.1"), synthetic).fit(
        resume=True, allow_change=("optimizer.lr",)
    )
    assert rows[1]["config_changes"] == {"optimizer.lr": [0.05, 0.1]}
    assert "config_changes" not in rows[0]
    assert json.loads((tmp_path / "t" / "config.json").read_text())["optimizer"]["lr"] == 0.1
    assert read_jsonl(tmp_path / "t" / "metrics.jsonl")[1]["config_changes"] == {
        "optimizer.lr": [0.05, 0.1]
    }


def test_a_resume_applies_an_allowed_change_of_the_optimizer_hyperparameters(tmp_path, synthetic):
    Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit()
    changed = _cfg(
        tmp_path, "run.epochs=2", "optimizer.weight_decay=0.01", "optimizer.momentum=0.5"
    )
    trainer = Trainer(changed, synthetic)
    rows = trainer.fit(resume=True, allow_change=("optimizer.weight_decay", "optimizer.momentum"))
    assert rows[1]["config_changes"] == {
        "optimizer.momentum": [0.9, 0.5],
        "optimizer.weight_decay": [0.0001, 0.01],
    }
    # Not the checkpoint's values, which torch's load_state_dict brings back with the state.
    assert [(g["weight_decay"], g["momentum"]) for g in trainer.optimizer.param_groups] == [
        (0.01, 0.5)
    ] * len(trainer.optimizer.param_groups)


def test_resume_never_shortens_a_run(tmp_path, synthetic):
    Trainer(_cfg(tmp_path, "run.epochs=2"), synthetic).fit()
    config = (tmp_path / "t" / "config.json").read_text()
    with pytest.raises(TrainingError, match="trained 2 epochs.*run.epochs >= 2"):
        Trainer(_cfg(tmp_path, "run.epochs=1"), synthetic).fit(resume=True)
    assert (tmp_path / "t" / "config.json").read_text() == config


def test_batch_larger_than_dataset_rejected(tmp_path, synthetic):
    with pytest.raises(ConfigError, match="train.batch_size.*only 600 examples"):
        Trainer(_cfg(tmp_path, "train.batch_size=601"), synthetic)


def _run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bigbatch", "train", *args], env=env, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_at_most_that_epoch(tmp_path):
    args = [
        "--set",
        "data.format=synthetic",
        "--set",
        "data.train_limit=3000",
        "--set",
        "data.test_limit=200",
        "--set",
        f"runtime.output_dir={tmp_path}",
        "--set",
        "run.name=k",
        "--set",
        "run.epochs=4",
        "--set",
        "train.batch_size=16",
        "--set",
        "runtime.progress=off",
        "--set",
        "runtime.threads=1",
    ]
    run = tmp_path / "k"
    proc = _run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # now inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(run / "checkpoint.pt")
    assert 1 <= state["epoch"] < 4
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] in (
        list(range(1, state["epoch"] + 1)),
        list(range(1, state["epoch"])),
    )
    resumed = subprocess.run(
        [sys.executable, "-m", "bigbatch", "train", *args, "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = tmp_path / "u"
    done = subprocess.run(
        [sys.executable, "-m", "bigbatch", "train", *args, "--set", "run.name=u"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _strip_times(read_jsonl(run / "metrics.jsonl")) == _strip_times(
        read_jsonl(uninterrupted / "metrics.jsonl")
    )


@pytest.mark.data
@pytest.mark.slow
def test_end_to_end_cifar_subset_beats_chance(tmp_path, cifar_zip):
    cfg = load_config(
        None,
        [
            f"data.path={cifar_zip}",
            "data.train_limit=3000",
            "data.test_limit=1000",
            f"runtime.output_dir={tmp_path}",
            "run.epochs=4",
            "train.batch_size=32",
            "optimizer.lr=0.02",
            "runtime.progress=off",
            "runtime.cache_dir=",
        ],
    )
    rows = Trainer(cfg).fit()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.2  # chance is 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_kfac_run_trains(tmp_path, synthetic, precision):
    cfg = _cfg(tmp_path, "run.epochs=2", 'optimizer.name="kfac"', f'train.precision="{precision}"')
    rows = Trainer(cfg, synthetic).fit()
    reference = Trainer(_cfg(tmp_path / "fp32", "run.epochs=2", 'optimizer.name="kfac"'), synthetic)
    exact = reference.fit()
    assert rows[-1]["kfac_nonfinite_factors"] == rows[-1]["kfac_nonfinite_updates"] == 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] == pytest.approx(exact[-1]["test_acc"], abs=0.05)
    # The loss scale is part of the run's state: a resume continues it.
    if precision == "fp16":
        assert load_checkpoint(tmp_path / "t" / "checkpoint.pt")["scaler"]["scale"] > 0
