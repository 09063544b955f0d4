"""Checkpoints: a file whose unpickling would run code is refused, and nothing runs."""

import os
import subprocess
import sys

import pytest
import torch

from bigbatch.errors import TrainingError
from bigbatch.io import atomic_torch_save
from bigbatch.train.checkpoint import load_checkpoint


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"epoch": 1, "payload": _RunsCode(marker)})
    with pytest.raises(TrainingError, match="could run code when loaded.*does not open it"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
def test_commands_that_open_a_run_refuse_a_hostile_checkpoint(tmp_path, synthetic_run):
    marker = tmp_path / "code-ran"
    run = synthetic_run
    state = load_checkpoint(run / "checkpoint.pt")
    state["payload"] = _RunsCode(marker)
    torch.save(state, run / "checkpoint.pt")
    for args in (
        ["sharpness", str(run), "--examples", "64"],
        ["landscape", str(run), "--points", "3"],
        [
            "train",
            "--resume",
            "--set",
            f"runtime.output_dir={run.parent}",
            "--set",
            f"run.name={run.name}",
            "--set",
            "data.format=synthetic",
            "--set",
            "run.epochs=2",
            "--set",
            "runtime.progress=off",
        ],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bigbatch", *args], capture_output=True, text=True
        )
        assert proc.returncode != 0, args
        assert "could run code when loaded" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_bigbatch_checkpoints_load_with_weights_only(synthetic_run):
    state = load_checkpoint(synthetic_run / "checkpoint.pt")  # would raise if anything were refused
    assert state["epoch"] == 1 and set(state["rng"]) == {"torch", "numpy", "python"}
