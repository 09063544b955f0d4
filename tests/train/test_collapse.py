"""Collapse (train/health.py): a run that had learned and then sits at a uniform guess's loss
and accuracy stops as diverged, in unit cases and in a real run whose weights decay away."""

import math

import pytest

from bigbatch.config import load_config
from bigbatch.errors import DivergedError
from bigbatch.io import read_jsonl
from bigbatch.train.health import collapsed
from bigbatch.train.trainer import Trainer

UNIFORM = math.log(10)


def _rows(*epochs, clean=True):
    """One epoch per (train loss, test loss, accuracy) triple, the accuracy both train and test;
    ``clean``: with the clean train measurements beside them."""
    rows = []
    for epoch, (train, test, acc) in enumerate(epochs, start=1):
        row = {"epoch": epoch, "train_loss": train, "test_loss": test}
        row |= {"train_acc": acc, "test_acc": acc}
        if clean:
            row |= {"train_eval_loss": train, "train_eval_acc": acc}
        rows.append(row)
    return rows


LEARNED, CHANCE = (1.2, 1.3, 0.55), (UNIFORM, UNIFORM, 0.1)


def test_a_run_that_learned_then_sits_at_chance_collapsed():
    assert collapsed(_rows(LEARNED, CHANCE, CHANCE), 10, 2) is not None
    message = collapsed(_rows(LEARNED, CHANCE, CHANCE, CHANCE), 10, 3)
    assert "last 3 epochs, to epoch 4" in message and "warmup_epochs" in message
    assert collapsed(_rows(LEARNED, CHANCE, CHANCE), 10, 0) is None  # 0: never
    assert collapsed(_rows(LEARNED, CHANCE, CHANCE), 10, 3) is None  # not yet 3 epochs
    # Accuracy at up to twice a uniform guess's (20%) is still a collapse.
    assert collapsed(_rows(LEARNED, (UNIFORM, UNIFORM, 0.2), CHANCE), 10, 2) is not None


def test_runs_that_never_learned_or_overfit_have_not_collapsed():
    # A large batch's first epochs at chance: it has not learned yet.
    assert collapsed(_rows(CHANCE, CHANCE, CHANCE, CHANCE), 10, 3) is None
    # Overfitting: the test loss above log(10) while the train loss stays low.
    overfit = (0.3, 2.6, 0.5)
    assert collapsed(_rows(LEARNED, overfit, overfit, overfit), 10, 3) is None
    # One epoch of the three recovered.
    assert collapsed(_rows(LEARNED, CHANCE, (1.9, 1.9, 0.3), CHANCE), 10, 2) is None


def test_a_confident_model_that_is_often_wrong_has_not_collapsed():
    # Batch-2048 K-FAC on CIFAR-10 (the paper study, seed 2) after a loss spike at epoch 87:
    # train loss 6.5 and test loss 6.7, far above log(10), at 48% and 41% accuracy.
    spike = {"train_loss": 6.53, "train_acc": 0.485, "test_loss": 6.71, "test_acc": 0.413}
    rows = _rows(LEARNED, CHANCE, CHANCE, CHANCE, clean=False)
    for row in rows[1:]:
        row |= spike
    assert collapsed(rows, 10, 3) is None
    rows[2]["test_acc"] = rows[2]["train_acc"] = 0.1  # the other two still above 20%: not yet
    assert collapsed(rows, 10, 3) is None
    for row in rows[1:]:
        row["test_acc"] = row["train_acc"] = 0.1
    assert collapsed(rows, 10, 3) is not None


def test_the_clean_train_loss_decides_under_mixup():
    # Mixup keeps the loss on mixed targets near log(10) while the clean loss shows learning.
    rows = _rows(LEARNED, (1.4, 1.5, 0.5), (1.4, 1.5, 0.5))
    for row in rows:
        row["train_loss"] = 0.97 * UNIFORM
    assert collapsed(rows, 10, 2) is None
    # Without the clean measurement the mixed loss is all there is.
    rows = _rows(LEARNED, CHANCE, CHANCE, clean=False)
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
