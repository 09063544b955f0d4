"""Early stop at a target test accuracy (train/stopping.py, run.stop_at_test_acc): the run ends
after the first epoch reaching it, checkpointed, and skip/resume treat it as finished."""

import pytest

from bigbatch.config import load_config
from bigbatch.errors import ConfigError
from bigbatch.experiments.grid import StudyRun, run_status
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.stopping import reached_target, training_finished
from bigbatch.train.trainer import Trainer


def _cfg(out, *overrides):
    return load_config(
        None,
        [
            "data.format=synthetic",
            f"runtime.output_dir={out}",
            "run.name=t",
            "run.epochs=5",
            "train.batch_size=64",
            "runtime.progress=off",
            "train.train_eval_examples=0",
            "optimizer.lr=0.05",
            *overrides,
        ],
    )


def _same(rows):
    return [(r["epoch"], r["step"], r["test_acc"], r["train_loss"]) for r in rows]


def test_the_predicates():
    rows = [{"epoch": 1, "test_acc": 0.4}, {"epoch": 2, "test_acc": 0.6}]
    assert reached_target(rows, 0.6) and not reached_target(rows, 0.61)
    assert not reached_target(rows, 0.0)  # 0: no target
    assert training_finished(rows, 2, 0.0) and training_finished(rows, 5, 0.55)
    assert not training_finished(rows, 5, 0.7) and not training_finished([], 1, 0.5)


def test_run_stops_at_the_first_epoch_reaching_the_target(tmp_path, synthetic):
    full = Trainer(_cfg(tmp_path / "full"), synthetic).fit()
    accs = [r["test_acc"] for r in full]
    target = accs[1]  # epoch 2's accuracy: reached at epoch 2 or, if higher, at epoch 1
    first = next(e for e, a in enumerate(accs, 1) if a >= target)
    assert first < len(full), "the synthetic run should still improve after epoch 2"

    cfg = _cfg(tmp_path / "stop", f"run.stop_at_test_acc={target}")
    rows = Trainer(cfg, synthetic).fit()
    assert _same(rows) == _same(full[:first])  # the same epochs, then nothing more
    checkpoint = cfg.run_dir() / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["epoch"] == first
    run = StudyRun("t", 0, cfg)
    assert run_status(run) == "done"

    stamp = checkpoint.stat().st_mtime_ns
    resumed = Trainer(cfg, synthetic).fit(resume=True)  # nothing is left to train
    assert _same(resumed) == _same(rows)
    assert checkpoint.stat().st_mtime_ns == stamp


def test_a_run_short_of_its_target_trains_every_epoch(tmp_path, synthetic):
    cfg = _cfg(tmp_path, "run.epochs=2", "run.stop_at_test_acc=1.0")
    rows = Trainer(cfg, synthetic).fit()
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["test_acc"] < 1.0
    assert run_status(StudyRun("t", 0, cfg)) == "done"  # its epoch budget is spent


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_target_is_named(tmp_path, value):
    with pytest.raises(ConfigError, match="run.stop_at_test_acc"):
        _cfg(tmp_path, f"run.stop_at_test_acc={value}")
