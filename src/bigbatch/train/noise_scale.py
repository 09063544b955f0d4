"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 of McCandlish et al. (2018, "An Empirical
Model of Large-Batch Training"), measured during training from the gradients a step computes anyway
(no example goes forward or backward twice).

Sigma is the covariance of one example's loss gradient and G the full-data gradient, so a batch
gradient of size b has E|g_b|^2 = |G|^2 + tr(Sigma) / b (their appendix A.1). A step's gradient
G_B over B examples is the size-weighted mean of k >= 2 parts g_j over disjoint b_j examples:
data-parallel ranks (each rank's local gradient, before the all-reduce), else micro-batches (each
one's gradient is the change of the accumulated ``.grad`` across its backward). Summing the
expectation over the parts,

    E[sum_j b_j |g_j|^2] = B |G|^2 + k tr(Sigma)        E[B |G_B|^2] = B |G|^2 + tr(Sigma)

so a step's unbiased estimates are

    S    = (sum_j b_j |g_j|^2 - B |G_B|^2) / (k - 1)          of tr(Sigma)
    |G|^2 ~ |G_B|^2 - S / B                                    of |G|^2.

With equal parts (b_j = B / k, B_small = B / k, B_big = B) these are exactly appendix A.1's
S = (|G_Bsmall|^2 - |G_Bbig|^2) / (1/B_small - 1/B_big) and
|G|^2 = (B_big |G_Bbig|^2 - B_small |G_Bsmall|^2) / (B_big - B_small), with |G_Bsmall|^2 the mean
over the k parts; unequal parts (a short last micro-batch or shard) stay unbiased. The appendix
notes that the ratio of the two is a biased estimate of B_simple and that single steps are noisy:
we average each over the measured steps of an epoch (a plain mean, reset every epoch, so nothing
needs checkpointing and a resumed run equals an uninterrupted one) and report the ratio of the
means. Examples are drawn without replacement from N, which biases both by O(1 / N): negligible.
Mixup and CutMix pair examples within a batch, so parts are not independent: then approximate.

Which steps (``train.noise_scale`` on): every step whose gradient is already in parts, at the cost
of two gradient norms (and, with micro-batches, a copy of the gradient per micro-batch). Where it is
in one piece (one process, one micro-batch), steps 0, k, 2k, ... of each epoch
(k = ``train.noise_scale_split_every``; 0: none) split the batch into two micro-batches: the same
gradient to float rounding (forward_backward weights each micro-batch's loss by its share), at the
cost of running the batch as two half-size forward and backward passes. Not where a split changes
the maths: BatchNorm models (batch statistics over half the batch) and K-FAC statistics drawn per
forward pass (MC Fisher labels, a stats_fraction subsample). An epoch without a measured step has
null metrics.

Every value stays a device tensor until ``epoch_metrics`` reads the epoch's sums once (no host sync
per step). Squared norms are dot products in the gradients' dtype (float32), carried on in float64,
with a GradScaler's loss scale divided out; an overflowed (non-finite) step is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from bigbatch.config import Config
from bigbatch.models import has_batchnorm

# The metrics keys, one per epoch (null when no step was measured).
NOISE_SCALE_KEYS = ("grad_noise_scale", "grad_norm_sq", "grad_trace_sigma", "noise_scale_steps")


def step_estimates(
    parts_sum: torch.Tensor, full_sq_norm: torch.Tensor, batch: torch.Tensor | float, parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's unbiased (|G|^2, tr(Sigma)) from ``parts_sum`` = sum_j b_j |g_j|^2 over
    ``parts`` >= 2 disjoint parts and ``full_sq_norm`` = |G_B|^2 of the whole ``batch`` B."""
    if parts < 2:
        raise ValueError(f"the noise scale needs a gradient in at least 2 parts, got {parts}")
    trace = (parts_sum - batch * full_sq_norm) / (parts - 1)
    return full_sq_norm - trace / batch, trace


class NoiseScaleEstimator:
    """Sums of the per-step estimates of |G|^2 and tr(Sigma) over measured steps, on the device;
    ``result`` gives their means and B_simple = mean tr(Sigma) / mean |G|^2."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # |G|^2, S, steps

    def add(
        self,
        parts_sum: torch.Tensor,
        full_sq_norm: torch.Tensor,
        batch: torch.Tensor | float,
        parts: int,
    ) -> None:
        norm_sq, trace = step_estimates(parts_sum.double(), full_sq_norm.double(), batch, parts)
        step = torch.stack([norm_sq, trace, torch.ones_like(trace)])
        # A non-finite step (an fp16 overflow, which the optimizer skips too) is not counted.
        self.sums += torch.where(step.isfinite().all(), step, torch.zeros_like(step))

    def result(self) -> dict[str, float | int | None]:
        """The means since the last reset, read in one host transfer; B_simple is null unless
        both means are positive (a noise-dominated |G|^2 near zero gives no usable ratio)."""
        norm_sq_sum, trace_sum, steps = self.sums.tolist()
        if steps == 0:
            return dict.fromkeys(NOISE_SCALE_KEYS[:3]) | {"noise_scale_steps": 0}
        norm_sq, trace = norm_sq_sum / steps, trace_sum / steps
        return {
            "grad_noise_scale": trace / norm_sq if norm_sq > 0 and trace > 0 else None,
            "grad_norm_sq": norm_sq,
            "grad_trace_sigma": trace,
            "noise_scale_steps": int(steps),
        }


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    )


def squared_norm(params: list[nn.Parameter]) -> torch.Tensor:
    flat = _flat_grads(params)
    return torch.dot(flat, flat).double()


class MicroBatchGradients:
    """forward_backward's ``after_backward``: sum_j b_j |g_j|^2 over the micro-batches of a batch of
    ``batch`` examples, from the change of the accumulated gradient (one copy per micro-batch)."""

    def __init__(self, params: list[nn.Parameter], batch: int) -> None:
        self.params, self.batch, self.parts = params, batch, 0
        self.parts_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)
        self._before: torch.Tensor | None = None

    def __call__(self, size: int) -> None:
        after = _flat_grads(self.params)
        change = after if self._before is None else after - self._before
        # The change is size / batch times this micro-batch's mean-loss gradient g_j.
        self.parts_sum += torch.dot(change, change).double() * (self.batch**2 / size)
        self._before = after
        self.parts += 1


def split_keeps_the_maths(cfg: Config, model: nn.Module) -> bool:
    """Whether a batch split into micro-batches computes the same step (see the module notes)."""
    kfac_per_forward = cfg.optimizer.name == "kfac" and (
        cfg.kfac.fisher_type == "mc" or cfg.kfac.stats_fraction < 1
    )
    return not has_batchnorm(model) and not kfac_per_forward


class NoiseScaleProbe:
    """The trainer's side: which steps are measured (see the module notes), and their parts'
    gradients. Per step: ``begin_step`` gives the micro-batch size and forward_backward's callback,
    ``local_terms`` the extras reduce_step sums over ranks, ``end_step`` adds the measured step.
    ``split_every`` None: off; 0: only steps already in parts.
    """

    def __init__(
        self,
        split_every: int | None,
        model: nn.Module,
        world_size: int,
        can_split: bool,
        device: torch.device,
    ) -> None:
        self.enabled, self.world_size = split_every is not None, world_size
        self.split_every = split_every or 0
        self.can_split = can_split and self.split_every > 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.estimator = NoiseScaleEstimator(device)
        self.measuring = False
        self.micro_batches: MicroBatchGradients | None = None

    def begin_step(
        self, index: int, batch: int, micro: int
    ) -> tuple[int, Callable[[int], None] | None]:
        """The micro-batch size for step ``index`` of the epoch and the callback to pass on."""
        self.micro_batches = None
        self.measuring = self.enabled
        if not self.measuring or self.world_size > 1:
            return micro, None  # ranks are the parts: no callback
        if micro >= batch:
            if not (self.can_split and batch >= 2 and index % self.split_every == 0):
                self.measuring = False
                return micro, None
            micro = math.ceil(batch / 2)
        self.micro_batches = MicroBatchGradients(self.params, batch)
        return micro, self.micro_batches

    def local_terms(self, batch: int) -> list[torch.Tensor]:
        """This rank's b_j |g_j|^2 (its local mean gradient) for the step's collective, if any."""
        if not self.measuring or self.world_size == 1:
            return []
        return [squared_norm(self.params) * batch]

    def end_step(
        self, reduced_terms: list[torch.Tensor], batch: torch.Tensor, scaler: torch.amp.GradScaler
    ) -> None:
        """After reduce_step, before unscaling: add the step (``batch``: the global count)."""
        if not self.measuring:
            return
        full = squared_norm(self.params)
        if self.micro_batches is not None:
            parts_sum, parts = self.micro_batches.parts_sum, self.micro_batches.parts
        else:
            parts_sum, parts = reduced_terms[0].double(), self.world_size
        if scaler.is_enabled():
            # The device tensor: get_scale() would read it to the host.
            scale_sq = scaler._get_scale_async().double() ** 2  # type: ignore[union-attr]
            parts_sum, full = parts_sum / scale_sq, full / scale_sq
        self.estimator.add(parts_sum, full, batch.double(), parts)

    def epoch_metrics(self) -> dict[str, float | int | None]:
        """The epoch's metrics (``NOISE_SCALE_KEYS``); starts the next epoch's sums."""
        result = self.estimator.result()
        self.estimator.reset()
        return result
