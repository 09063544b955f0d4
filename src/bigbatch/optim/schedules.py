"""Learning-rate schedule: linear scaling rule, linear warm-up, step decay at given epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    """``lr_at(epoch, fraction)`` for 0-based ``epoch`` and ``fraction`` in [0, 1) of that epoch.

    ``decay_epochs`` are 1-based, as papers write them: the paper's "5e-3 -> 2.5e-3 (71 epoch)" is
    ``decay_epochs=[71], decay_factor=0.5``: epochs 1-70 use 5e-3, epochs 71 onward 2.5e-3.
    """

    base_lr: float
    decay_epochs: tuple[int, ...] = ()
    decay_factor: float = 0.5
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    batch_size: int = 128
    base_batch_size: int = 128
    linear_scaling: bool = False

    @classmethod
    def from_config(cls, schedule: Any, lr: float, batch_size: int) -> LRSchedule:
        """The schedule of a config's [schedule] section for base rate ``lr``."""
        return cls(
            base_lr=lr,
            decay_epochs=tuple(schedule.decay_epochs),
            decay_factor=schedule.decay_factor,
            warmup_epochs=schedule.warmup_epochs,
            warmup_start_factor=schedule.warmup_start_factor,
            batch_size=batch_size,
            base_batch_size=schedule.base_batch_size,
            linear_scaling=schedule.linear_scaling,
        )

    @property
    def peak_lr(self) -> float:
        scale = self.batch_size / self.base_batch_size if self.linear_scaling else 1.0
        return self.base_lr * scale

    def lr_at(self, epoch: int, fraction: float = 0.0) -> float:
        lr = self.peak_lr * self.decay_factor ** sum(1 for e in self.decay_epochs if epoch + 1 >= e)
        progress = epoch + fraction
        if progress < self.warmup_epochs:
            # Warm up per iteration from start_factor * lr to lr (Goyal et al. 2017).
            t = progress / self.warmup_epochs
            lr *= self.warmup_start_factor + (1.0 - self.warmup_start_factor) * t
        return lr
