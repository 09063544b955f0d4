"""The examples users copy run as shipped, on tiny data, so they cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.experiments.grid import load_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_kfac_custom_loop_runs_and_learns():
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "kfac_custom_loop.py"),
            "--synthetic",
            "--epochs",
            "2",
            "--mixup-alpha",
            "0.4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    accuracies = [
        float(line.rsplit(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("epoch")
    ]
    assert len(accuracies) == 2 and accuracies[-1] > 0.2  # 10 classes: chance is 0.1
    assert "kfac_eigh_failures': 0" in proc.stdout


def test_example_study_expands_to_its_grid():
    study = load_study(EXAMPLES / "my_study.toml")
    names = sorted(r.config.run.name for r in study.runs)
    assert len(names) == 2 * 3 * 2  # optimizers x batch sizes x seeds
    kfac_2048 = next(r.config for r in study.runs if r.config.run.name == "kfac-batch_size2048-s1")
    assert kfac_2048.optimizer.name == "kfac" and kfac_2048.train.batch_size == 2048
    assert kfac_2048.schedule.linear_scaling and kfac_2048.run.seed == 1


@pytest.mark.slow
def test_example_study_trains_on_tiny_data(tmp_path):
    sets = [
        "data.format=synthetic",
        "data.train_limit=256",
        "data.test_limit=64",
        "run.epochs=1",
        "train.train_eval_examples=0",
        "runtime.progress=off",
        "train.batch_size=64",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigbatch",
            "reproduce",
            str(EXAMPLES / "my_study.toml"),
            "--seeds",
            "0",
            "--output-dir",
            str(tmp_path),
            *(a for s in sets for a in ("--set", s)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report" / "report.md").exists()
