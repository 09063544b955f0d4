"""Loss smoothing by mixing examples: Mixup (Zhang et al. 2018), CutMix (Yun et al. 2019), label
smoothing.

Mixup draws lambda ~ Beta(alpha, alpha) once per batch, pairs each example i with example
j = perm(i) of the same batch, and trains on x~ = lambda x_i + (1 - lambda) x_j with the loss
lambda L(y_i) + (1 - lambda) L(y_j), which equals cross-entropy against the mixed one-hot target.

With K-FAC: the empirical Fisher is built from the gradients of this mixed loss (soft targets), so
Mixup changes both the gradient and the curvature estimate. The MC ("true") Fisher samples labels
from the model's prediction on the mixed input, so there Mixup changes only the inputs a, never the
targets behind G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MixedTargets:
    """Targets of a (possibly) mixed batch: the loss is lam * L(y_a) + (1 - lam) * L(y_b)."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float

    def narrow(self, start: int, length: int) -> MixedTargets:
        return MixedTargets(
            self.y_a.narrow(0, start, length), self.y_b.narrow(0, start, length), self.lam
        )


def mixed_cross_entropy(
    logits: torch.Tensor, targets: MixedTargets, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over the batch of lam * CE(y_a) + (1 - lam) * CE(y_b)."""
    loss = F.cross_entropy(logits, targets.y_a, label_smoothing=label_smoothing)
    if targets.lam < 1.0:
        loss = targets.lam * loss + (1.0 - targets.lam) * F.cross_entropy(
            logits, targets.y_b, label_smoothing=label_smoothing
        )
    return loss


def mixed_correct(logits: torch.Tensor, targets: MixedTargets) -> torch.Tensor:
    """Top-1 hits weighted like the loss (an exact count when nothing is mixed)."""
    pred = logits.argmax(1)
    hits = (pred == targets.y_a).sum().float()
    if targets.lam < 1.0:
        hits = targets.lam * hits + (1.0 - targets.lam) * (pred == targets.y_b).sum().float()
    return hits


class BatchMixer:
    """Mixes whole batches; randomness depends only on (seed, epoch, batch index), so runs resume
    exactly."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, seed: int = 0):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 (0 disables)")
        if mixup_alpha > 0 and cutmix_alpha > 0:
            raise ValueError("enable either Mixup or CutMix, not both")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.seed = seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch * 7919 + 17)

    def _beta(self, alpha: float) -> float:
        # Beta(a, a) from two Gammas, drawn with our own generator for reproducibility.
        g1 = torch._standard_gamma(
            torch.tensor([alpha], dtype=torch.float64), generator=self.generator
        )
        g2 = torch._standard_gamma(
            torch.tensor([alpha], dtype=torch.float64), generator=self.generator
        )
        return float(g1 / (g1 + g2))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, MixedTargets]:
        if not self.enabled:
            return x, MixedTargets(y, y, 1.0)
        perm = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        if self.mixup_alpha > 0:
            lam = self._beta(self.mixup_alpha)
            mixed = x.mul(lam).add_(x.index_select(0, perm), alpha=1.0 - lam)
            return mixed, MixedTargets(y, y.index_select(0, perm), lam)
        return self._cutmix(x, y, perm)

    def _cutmix(
        self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor
    ) -> tuple[torch.Tensor, MixedTargets]:
        lam = self._beta(self.cutmix_alpha)
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy = int(torch.randint(h, (1,), generator=self.generator))
        cx = int(torch.randint(w, (1,), generator=self.generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x.index_select(0, perm)[:, :, y0:y1, x0:x1]
        # The label weight is the area actually kept after clipping the box at the border.
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return mixed, MixedTargets(y, y.index_select(0, perm), lam)
