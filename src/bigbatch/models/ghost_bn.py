"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better",
Algorithm 1).

In training, each consecutive slice of ``ghost_batch_size`` examples (the last one may be smaller)
is normalized with its own mean and biased variance, and the running statistics take one
exponential-moving-average update per slice, in order, exactly as ``nn.BatchNorm2d`` applied to
the slices one after another would (the unbiased slice variance enters ``running_var``). That is
Hoffer et al.'s update, ``mu_run = (1 - eta)^k mu_run + sum_i eta (1 - eta)^(k - i) mu_i`` over
the k slices (``num_batches_tracked`` counts slices). A micro-batch that is a multiple of the ghost
batch size sees the same slices in the same order, so splitting a batch into such micro-batches
changes nothing. In evaluation, and with ``ghost_batch_size`` 0 or at least the batch, it is plain
BatchNorm; the affine parameters stay ``weight`` and ``bias`` of an ``nn.BatchNorm2d``, so code
that looks for BatchNorm still finds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, ghost_batch_size: int = 0, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if ghost_batch_size < 0:
            raise ValueError(f"ghost_batch_size must be >= 0, got {ghost_batch_size}")
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ghost = self.ghost_batch_size
        if not self.training or ghost == 0 or x.shape[0] <= ghost:
            return super().forward(x)
        if self.momentum is None:
            raise ValueError("GhostBatchNorm2d needs a momentum (not a cumulative average)")
        tracking = self.track_running_stats
        pieces = x.split(ghost)
        if tracking and self.num_batches_tracked is not None:
            # Counted per slice, as per-slice BatchNorm counts, so micro-batches count the same.
            self.num_batches_tracked.add_(len(pieces))
        # One F.batch_norm per slice: each updates the running statistics in turn (Hoffer et al.).
        parts = [
            F.batch_norm(
                piece,
                self.running_mean if tracking else None,
                self.running_var if tracking else None,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
            )
            for piece in pieces
        ]
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"
