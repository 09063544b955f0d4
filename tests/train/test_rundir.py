"""Run directories (train/rundir.py): --overwrite never leaves a half-replaced run, a run being
trained is locked, and a full disk is a message that keeps the last checkpoint.
"""

import json
import os
import resource
import signal
import subprocess
import sys

from bigbatch.cli import main as cli_main
from bigbatch.train.rundir import RunLock


def _train_argv(run, *sets, flag=None):
    argv = ["train"] + ([flag] if flag else [])
    for s in [
        "data.format=synthetic",
        "data.train_limit=256",
        "data.test_limit=128",
        "run.epochs=1",
        "train.batch_size=64",
        "runtime.progress=off",
        f"runtime.output_dir={run.parent}",
        f"run.name={run.name}",
        *sets,
    ]:
        argv += ["--set", s]
    return argv


def _contents(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_failed_overwrite_leaves_the_old_run_intact(synthetic_run, capsys):
    (synthetic_run / "sharpness.json").write_text('{"from": "the old run"}')
    before = _contents(synthetic_run)
    # Diverges in its first epoch, before any checkpoint of the new run exists.
    assert cli_main(_train_argv(synthetic_run, "optimizer.lr=1e6", flag="--overwrite")) == 2
    err = capsys.readouterr().err
    assert "unchanged in" in err and "--overwrite" in err and "--resume" not in err
    assert _contents(synthetic_run) == before
    assert sorted(p.name for p in synthetic_run.parent.iterdir()) == ["r"]  # no staging dir left
    # The old run is still usable: it resumes (nothing left to do) and reports.
    assert cli_main(_train_argv(synthetic_run, flag="--resume")) == 0
    assert cli_main(["report", str(synthetic_run)]) == 0


def test_successful_overwrite_replaces_the_whole_run(synthetic_run):
    (synthetic_run / "sharpness.json").write_text('{"from": "the old run"}')
    (synthetic_run / "landscape").mkdir()
    old_metrics = (synthetic_run / "metrics.jsonl").read_text()
    assert cli_main(_train_argv(synthetic_run, "optimizer.lr=0.02", flag="--overwrite")) == 0
    assert not (synthetic_run / "sharpness.json").exists()
    assert not (synthetic_run / "landscape").exists()
    assert (synthetic_run / "metrics.jsonl").read_text() != old_metrics
    assert json.loads((synthetic_run / "config.json").read_text())["optimizer"]["lr"] == 0.02
    assert sorted(p.name for p in synthetic_run.parent.iterdir()) == ["r"]


def test_a_run_being_trained_is_locked(synthetic_run, capsys):
    lock = RunLock(synthetic_run)  # flock conflicts between open files, even in one process
    try:
        for flag in ("--resume", "--overwrite"):
            assert cli_main(_train_argv(synthetic_run, "run.epochs=2", flag=flag)) == 2
            assert f"being trained by another process (pid {os.getpid()})" in (
                capsys.readouterr().err
            )
    finally:
        lock.release()
    assert cli_main(_train_argv(synthetic_run, "run.epochs=2", flag="--resume")) == 0


def test_a_killed_overwrite_leaves_a_staging_dir_that_the_next_one_removes(synthetic_run):
    stale = synthetic_run.parent / ".r.overwrite-999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert cli_main(_train_argv(synthetic_run, flag="--overwrite")) == 0
    assert not stale.exists()


def _limit_file_size():
    # A file-size limit makes writes beyond it fail with EFBIG, as a full disk fails them.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))


def test_full_disk_is_a_message_and_the_last_checkpoint_survives(synthetic_run):
    checkpoint = (synthetic_run / "checkpoint.pt").read_bytes()
    argv = _train_argv(synthetic_run, "run.epochs=2", flag="--resume")
    done = subprocess.run(
        [sys.executable, "-m", "bigbatch", *argv],
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "could not write" in done.stderr and "checkpoint.pt" in done.stderr
    assert "previous version is intact" in done.stderr and "Traceback" not in done.stderr
    assert (synthetic_run / "checkpoint.pt").read_bytes() == checkpoint
    assert not [p for p in synthetic_run.iterdir() if p.name.endswith(".tmp")]


def test_resume_restores_a_damaged_metrics_file(synthetic_run, capsys):
    good = (synthetic_run / "metrics.jsonl").read_text()
    (synthetic_run / "metrics.jsonl").write_text(good + '{"epoch": 2, "trai\n')
    assert cli_main(["report", str(synthetic_run)]) == 2
    assert "--resume" in capsys.readouterr().err  # the advice, and it works:
    assert cli_main(_train_argv(synthetic_run, flag="--resume")) == 0
    assert (synthetic_run / "metrics.jsonl").read_text() == good
