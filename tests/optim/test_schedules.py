"""Learning-rate schedules (optim/schedules.py): step decay, warm-up and linear scaling."""

import pytest

from bigbatch.optim.schedules import LRSchedule


def test_step_decay_at_epoch_71_as_in_the_seed():
    s = LRSchedule(base_lr=5e-3, decay_epochs=(71,), decay_factor=0.5)
    assert s.lr_at(0) == 5e-3
    assert s.lr_at(69, 0.99) == 5e-3  # epoch 70 (1-based)
    assert s.lr_at(70) == 2.5e-3  # epoch 71
    assert s.lr_at(149) == 2.5e-3


def test_warmup_and_linear_scaling():
    s = LRSchedule(
        base_lr=0.1,
        batch_size=2048,
        base_batch_size=128,
        linear_scaling=True,
        warmup_epochs=5,
        warmup_start_factor=0.1,
        decay_epochs=(30, 60),
        decay_factor=0.1,
    )
    assert s.peak_lr == pytest.approx(1.6)
    assert s.lr_at(0) == pytest.approx(0.16)
    assert s.lr_at(2, 0.5) == pytest.approx(1.6 * (0.1 + 0.9 * 0.5))
    assert s.lr_at(5) == pytest.approx(1.6)
    assert s.lr_at(28, 0.99) == pytest.approx(1.6)  # epoch 29 (1-based)
    assert s.lr_at(29) == pytest.approx(0.16)  # epoch 30
    assert s.lr_at(59) == pytest.approx(0.016)  # epoch 60
