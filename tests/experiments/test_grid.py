"""Studies (experiments/grid.py): the shipped configs, grid expansion, errors, skip and resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.errors import ConfigError, TrainingError
from bigbatch.experiments.grid import load_study, run_status, run_study
from bigbatch.io import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_paper_config_is_the_seed_table():
    study = load_study(ROOT / "configs" / "paper.toml")
    runs = {r.config.run.name: r.config for r in study.runs}
    assert len(runs) == 8
    # One seed unless --seeds asks for more; every run's flatness analysed after training.
    assert study.seeds == [0] and study.flatness is not None and study.flatness.distance == 0.1
    assert len(load_study(ROOT / "configs" / "paper.toml", seeds=[0, 1, 2]).runs) == 24
    expected_lr = {
        "sb-sgd": 1e-3,
        "lb-sgd": 5e-3,
        "sb-kfac": 2e-3,
        "lb-kfac": 4e-3,
        "sb-sgd-mixup": 5e-3,
        "lb-sgd-mixup": 1e-2,
        "sb-kfac-mixup": 5e-3,
        "lb-kfac-mixup": 8e-3,
    }
    for name, cfg in runs.items():
        assert cfg.optimizer.lr == expected_lr[name]
        assert cfg.run.epochs == 150
        assert cfg.schedule.decay_epochs == [71] and cfg.schedule.decay_factor == 0.5
        assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 1e-4
        assert cfg.train.batch_size == (128 if name.startswith("sb") else 2048)
        assert cfg.optimizer.name == ("kfac" if "kfac" in name else "sgd")
        assert cfg.model.name == "lenet5"
        if name.endswith("mixup"):
            assert cfg.augment.mixup_alpha == (0.9 if name.startswith("sb") else 0.7)
        else:
            assert cfg.augment.mixup_alpha == 0.0


def test_every_shipped_study_config_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        if path.name == "demo.toml" or path.name.startswith("sweep-"):
            continue  # a single-run train config, or a sweep (tests/experiments/test_sweep.py)
        study = load_study(path)
        assert study.runs, path
    smoothing = {
        r.config.run.name: r.config for r in load_study(ROOT / "configs" / "smoothing.toml").runs
    }
    assert len(smoothing) == 9 * 3
    scaled = smoothing["sgd-warmup-linear-scaling-s0"]
    assert scaled.schedule.linear_scaling and scaled.schedule.warmup_epochs == 5
    assert (
        smoothing["kfac-cutmix-s2"].augment.cutmix_alpha == 1.0
        and smoothing["kfac-cutmix-s2"].run.seed == 2
    )


def _write_study(tmp_path, body):
    path = tmp_path / "s.toml"
    path.write_text(f'[study]\nname = "s"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    return path


def test_grid_expansion_with_seeds_and_axes(tmp_path):
    path = _write_study(
        tmp_path,
        """seeds = [0, 1]
[base.run]
epochs = 2
[base.optimizer]
lr = 0.1
[[runs]]
name = "a"
train = { batch_size = 32 }
[[runs]]
name = "b"
optimizer = { name = "kfac" }
[grid]
"augment.label_smoothing" = [0.0, 0.1]
""",
    )
    study = load_study(path, ["run.epochs=3"])
    names = [r.config.run.name for r in study.runs]
    assert names == [
        "a-label_smoothing0.0-s0",
        "a-label_smoothing0.0-s1",
        "a-label_smoothing0.1-s0",
        "a-label_smoothing0.1-s1",
        "b-label_smoothing0.0-s0",
        "b-label_smoothing0.0-s1",
        "b-label_smoothing0.1-s0",
        "b-label_smoothing0.1-s1",
    ]
    first = study.runs[0].config
    assert first.train.batch_size == 32 and first.optimizer.lr == 0.1 and first.run.epochs == 3
    assert study.runs[1].config.run.seed == 1
    assert study.runs[2].config.augment.label_smoothing == 0.1
    assert (
        study.runs[4].config.optimizer.name == "kfac"
        and study.runs[4].config.train.batch_size == 128
    )
    assert study.runs[0].run_dir == tmp_path / "out" / "runs" / "a-label_smoothing0.0-s0"
    assert load_study(path, seeds=[7]).runs[0].config.run.seed == 7


def test_bad_study_values_name_the_run(tmp_path):
    path = _write_study(tmp_path, '[[runs]]\nname = "x"\noptimizer = { lr = -1.0 }\n')
    with pytest.raises(ConfigError, match="run 'x'.*optimizer.lr"):
        load_study(path)
    path = _write_study(tmp_path, '[[runs]]\nname = "x"\n[[runs]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="two runs named 'x'"):
        load_study(path)


def test_skip_finished_and_resume_interrupted(small_study):
    path = small_study(epochs=2)
    study = load_study(path)
    assert [run_status(r) for r in study.runs] == ["new", "new"]
    # "two" is interrupted after epoch 1: train it with epochs=1 under the same directory.
    from bigbatch.train.trainer import Trainer

    one_epoch = load_study(path, ["run.epochs=1"]).runs[1]
    Trainer(one_epoch.config).fit()
    assert run_status(study.runs[1]) == "partial"
    run_study(study)
    assert [run_status(r) for r in study.runs] == ["done", "done"]
    stamp = (study.runs[0].run_dir / "checkpoint.pt").stat().st_mtime_ns
    run_study(study)  # both finished: nothing is retrained
    assert (study.runs[0].run_dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    rows = read_jsonl(study.runs[1].run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    # A finished run kept without its checkpoint (committed results) is not retrained over.
    (study.runs[0].run_dir / "checkpoint.pt").unlink()
    kept = (study.runs[0].run_dir / "metrics.jsonl").read_bytes()
    assert run_status(study.runs[0]) == "done"
    run_study(study)
    assert not (study.runs[0].run_dir / "checkpoint.pt").exists()
    assert (study.runs[0].run_dir / "metrics.jsonl").read_bytes() == kept
    # A kept run stands only as it was run: more epochs or another config stop the study
    # before its numbers are overwritten.
    with pytest.raises(TrainingError, match=r"'one' .* ends at epoch 2 of 3, so it cannot go on"):
        run_status(load_study(path, ["run.epochs=3"]).runs[0])
    with pytest.raises(TrainingError, match=r"changed its config \(optimizer.lr: \S+ -> 0.1\)"):
        run_study(load_study(path, ["optimizer.lr=0.1"]))
    assert (study.runs[0].run_dir / "metrics.jsonl").read_bytes() == kept
    saved_config = study.runs[0].run_dir / "config.json"
    text = saved_config.read_text()
    saved_config.write_text(text[: len(text) // 2])
    with pytest.raises(TrainingError, match=r"'one' .*config.json' is not a bigbatch run config"):
        run_study(study)
    saved_config.write_text(text)
    assert (study.runs[0].run_dir / "metrics.jsonl").read_bytes() == kept
    # A damaged metrics file and no checkpoint: nothing to keep or resume, the run starts again.
    (study.runs[1].run_dir / "checkpoint.pt").unlink()
    (study.runs[1].run_dir / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')
    assert run_status(study.runs[1]) == "new"


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_sigterm_ends_a_parallel_study_and_its_workers(small_study):
    path = small_study(epochs=200)
    study = load_study(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigbatch", "reproduce", str(path), "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not all((r.run_dir / "checkpoint.pt").exists() for r in study.runs):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    workers = [c for c in _children(proc.pid) if _alive(c)]
    assert len(workers) >= 2  # the pool's workers (its resource tracker may add one)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived the study"
    # Nothing was left locked or half-written: each run resumes from its last checkpoint.
    assert [run_status(r) for r in study.runs] == ["partial", "partial"]
    from bigbatch.train.rundir import RunLock

    for r in study.runs:
        RunLock(r.run_dir).release()


@pytest.mark.slow
def test_a_parallel_study_ends_cleanly_with_the_serial_results(small_study):
    # Three runs on two workers: a replacement worker is started after the first run ends.
    path = small_study(epochs=2, names=("one", "two", "three"))
    serial_path = path.with_name("serial.toml")
    serial_path.write_text(path.read_text().replace('/out"', '/serial"'))
    for config, jobs in ((path, "2"), (serial_path, "1")):
        done = subprocess.run(
            [sys.executable, "-m", "bigbatch", "reproduce", str(config), "--jobs", jobs],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "leaked" not in done.stderr, done.stderr
    for run, serial in zip(load_study(path).runs, load_study(serial_path).runs, strict=True):
        assert run_status(run) == "done"
        parallel_rows = read_jsonl(run.run_dir / "metrics.jsonl")
        serial_rows = read_jsonl(serial.run_dir / "metrics.jsonl")
        assert [r["epoch"] for r in parallel_rows] == [1, 2]
        for key in ("train_loss", "test_loss", "test_acc"):
            assert [r[key] for r in parallel_rows] == pytest.approx(
                [r[key] for r in serial_rows], rel=1e-4
            ), key
