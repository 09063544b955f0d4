"""Collapse (train/health.py): a run that had learned and then sits at a uniform guess's loss
stops as diverged, in unit cases and in a real run whose weights decay away."""

import math

import pytest

from bigbatch.config import load_config
from bigbatch.errors import DivergedError
from bigbatch.io import read_jsonl
from bigbatch.train.health import collapsed
from bigbatch.train.trainer import Trainer

UNIFORM = math.log(10)


def _rows(*losses, clean=True):
    """One epoch per (train, test) loss pair; ``clean``: with the clean train loss beside it."""
    rows = []
    for epoch, (train, test) in enumerate(losses, start=1):
        row = {"epoch": epoch, "train_loss": train, "test_loss": test}
        if clean:
            row["train_eval_loss"] = train
        rows.append(row)
    return rows


def test_a_run_that_learned_then_sits_at_chance_collapsed():
    learned, chance = (1.2, 1.3), (UNIFORM, UNIFORM)
    assert collapsed(_rows(learned, chance, chance), 10, 2) is not None
    message = collapsed(_rows(learned, chance, chance, chance), 10, 3)
    assert "last 3 epochs, to epoch 4" in message and "warmup_epochs" in message
    assert collapsed(_rows(learned, chance, chance), 10, 0) is None  # 0: never
    assert collapsed(_rows(learned, chance, chance), 10, 3) is None  # not yet 3 epochs


def test_runs_that_never_learned_or_overfit_have_not_collapsed():
    chance = (UNIFORM, UNIFORM)
    # A large batch's first epochs at chance: it has not learned yet.
    assert collapsed(_rows(chance, chance, chance, chance), 10, 3) is None
    # Overfitting: the test loss above log(10) while the train loss stays low.
    overfit = (0.3, 2.6)
    assert collapsed(_rows((1.2, 1.3), overfit, overfit, overfit), 10, 3) is None
    # One epoch of the three recovered.
    assert collapsed(_rows((1.2, 1.3), chance, (1.9, 1.9), chance), 10, 2) is None


def test_the_clean_train_loss_decides_under_mixup():
    # Mixup keeps the loss on mixed targets near log(10) while the clean loss shows learning.
    rows = _rows((1.2, 1.3), (1.4, 1.5), (1.4, 1.5))
    for row in rows:
        row["train_loss"] = 0.97 * UNIFORM
    assert collapsed(rows, 10, 2) is None
    # Without the clean measurement the mixed loss is all there is.
    rows = _rows((1.2, 1.3), (UNIFORM, UNIFORM), (UNIFORM, UNIFORM), clean=False)
    assert collapsed(rows, 10, 2) is not None


def test_a_real_run_whose_weights_decay_away_stops_as_collapsed(tmp_path, synthetic):
    def cfg(*overrides):
        return load_config(
            None,
            [
                "data.format=synthetic",
                f"runtime.output_dir={tmp_path}",
                "run.name=t",
                "train.batch_size=64",
                "runtime.progress=off",
                "train.train_eval_examples=200",
                "optimizer.lr=0.05",
                *overrides,
            ],
        )

    learned = Trainer(cfg("run.epochs=3"), synthetic).fit()
    assert learned[-1]["train_eval_loss"] < 0.8 * UNIFORM
    # Weight decay of 10 at lr 0.05 halves the weights every step: the model forgets everything
    # within an epoch, with finite losses near log(10) that the divergence check lets through.
    decayed = cfg("run.epochs=10", "optimizer.weight_decay=10", "runtime.collapse_epochs=2")
    with pytest.raises(DivergedError, match=r"last 2 epochs, to epoch 5, .* it collapsed"):
        Trainer(decayed, synthetic).fit(resume=True, allow_change=("optimizer.weight_decay",))
    rows = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # epoch 5's row is not written
    assert all(r["test_loss"] >= 0.95 * UNIFORM for r in rows[3:])
