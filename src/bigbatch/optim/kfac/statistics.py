"""K-FAC's statistics: hooks on the registered layers, the MC Fisher's sampled labels, a step's
factor sums and their running averages (the preconditioner in preconditioner.py builds on it)."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.config import KFACConfig
from bigbatch.optim.kfac.batchnorm import BatchNormFactors, BatchNormState
from bigbatch.optim.kfac.bookkeeping import HealthCounters, PartTimes
from bigbatch.optim.kfac.layers import make_layer_factors
from bigbatch.optim.kfac.state import LayerState

# Any layer's state: Kronecker factors (Linear, Conv2d) or 2x2 blocks (BatchNorm); same methods.
BlockState = LayerState | BatchNormState
# Per layer: its statistics' sums by name, and the examples that contributed them.
BatchStatistics = dict[str, tuple[dict[str, torch.Tensor], float | torch.Tensor]]


def _as_device_vector(values: list[float | torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Host numbers or device scalars as one vector on ``like``'s device (one copy for numbers)."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values])


def make_layer_state(name: str, module: nn.Module, batchnorm: str) -> BlockState | None:
    """The block K-FAC keeps for ``module``, or None when it has no curvature for it."""
    factors = make_layer_factors(name, module)
    if factors is not None:
        return LayerState(factors)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if batchnorm == "unit" and module.affine:
            return BatchNormState(BatchNormFactors(name, module))
    return None


TIMING_PARTS = ("statistics", "eigendecomposition", "preconditioning", "communication")
# scaled_overflow_steps: steps whose loss-scaled gradients overflowed (fp16); a GradScaler skips
# them, K-FAC skips their statistics, and neither is a fault. damping_below_resolution:
# decompositions whose damping the factors' rounding swamps (their updates come out too large).
HEALTH_COUNTERS = (
    "nonfinite_factors",
    "eigh_retries",
    "eigh_failures",
    "nonfinite_updates",
    "scaled_overflow_steps",
    "damping_below_resolution",
)


class FactorStatistics:
    """Collects every registered layer's statistics on steps where ``steps % factor_interval ==
    0`` and folds them into running averages; ``options`` are validated by the caller."""

    def __init__(self, model: nn.Module, options: KFACConfig, seed: int, factor_dtype: torch.dtype):
        self.options = options
        self.factor_decay = options.factor_decay
        self.factor_interval = options.factor_interval
        self.fisher_type = options.fisher_type
        self.stats_fraction = options.stats_fraction
        self.factor_dtype = factor_dtype
        self.seed = seed
        self.mc_generator: torch.Generator | None = None  # made on the model's device, when used
        patterns = [re.compile(p) for p in options.skip_layers]
        self.layers: dict[str, BlockState] = {}
        for name, module in model.named_modules():
            if any(p.fullmatch(name) for p in patterns):
                continue
            state = make_layer_state(name, module, options.batchnorm)
            if state is not None:
                self.layers[name] = state
        if not self.layers:
            warnings.warn(
                "KFACPreconditioner found no Linear or Conv2d layer to precondition", stacklevel=2
            )

        self.steps = 0
        # Examples through the model since the last step (all, not only sampled).
        self.examples_seen = 0
        self.times = PartTimes(TIMING_PARTS)
        self.counters = HealthCounters(HEALTH_COUNTERS)
        self._mc_outputs: list[tuple[Any, torch.Tensor]] = []
        self._warned_missing = False
        self._scaled = False
        # Whether this step's scaled gradients overflowed.
        self._overflow: torch.Tensor | None = None
        self._model: nn.Module | None = model  # None once remove() is called
        self._handles: list[Any] = []
        self.sync_hooks()

    def sync_hooks(self) -> None:
        """Hooks only on the steps that collect statistics: the forwards of the other steps run
        without any (so a compiled model's graph holds no Python of K-FAC's on them)."""
        if self._model is None or bool(self._handles) == self.collecting:
            return
        if self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            return
        self._handles = [
            state.factors.module.register_forward_hook(self._forward_hook(state.factors))
            for state in self.layers.values()
        ]
        self._handles.append(self._model.register_forward_pre_hook(self._count_examples))

    def _count_examples(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if model.training and torch.is_grad_enabled() and self.collecting:
            self.examples_seen += inputs[0].shape[0]

    # -- hooks -----------------------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        return self.steps % self.factor_interval == 0

    def _forward_hook(self, factors: Any):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and self.collecting):
                return
            with self.times.measure("statistics", output.device):
                x = inputs[0]
                k = self._sampled_rows(x.shape[0])
                factors.add_input(x, k)
                if self.fisher_type == "empirical":
                    output.register_hook(lambda grad: self._grad_hook(factors, grad, k))
                else:
                    self._mc_outputs.append((factors, output))

        return hook

    def _grad_hook(self, factors: Any, grad: torch.Tensor, k: int) -> None:
        with self.times.measure("statistics", grad.device):
            factors.add_output_grad(grad, k)

    def accumulate_mc_fisher(self, logits: torch.Tensor) -> None:
        """MC Fisher: backprop a loss with labels sampled from softmax(logits) to the layer outputs
        only."""
        if self.fisher_type != "mc" or not self._mc_outputs:
            self._mc_outputs.clear()
            return
        with self.times.measure("statistics", logits.device):
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=1)
                sampled = torch.multinomial(probs, 1, generator=self._generator(probs.device))
                sampled = sampled.squeeze(1)
            # A sum of per-example losses: each output gradient is that example's own gradient.
            loss = F.cross_entropy(logits, sampled, reduction="sum")
            outputs = [o for _, o in self._mc_outputs]
            grads = torch.autograd.grad(loss, outputs, retain_graph=True)
            for (factors, out), grad in zip(self._mc_outputs, grads):
                factors.add_output_grad(grad, self._sampled_rows(out.shape[0]))
            self._mc_outputs.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        """The MC labels' generator, on the device the logits are on (no host round trip)."""
        if self.mc_generator is None or self.mc_generator.device != device:
            # A device's generator state cannot move to another: reseed from the seed and step.
            self.mc_generator = torch.Generator(device).manual_seed(self.seed + self.steps)
        return self.mc_generator

    def _sampled_rows(self, n: int) -> int:
        return max(1, math.ceil(n * self.stats_fraction))

    def _batch_factors(self, grad_scale: float | torch.Tensor | None = None) -> BatchStatistics:
        """Per layer: (its statistics' sums, contributing examples), with the output-gradient
        sums scaled to per-example gradients."""
        out: BatchStatistics = {}
        missing = []
        # Empirical: hooks saw S g / N for a mean loss over N examples scaled by S (a GradScaler's,
        # else 1), so sum(g g^T) = (N / S)^2 * raw sum. The MC backward is never scaled.
        scale: float | torch.Tensor = 1.0
        if self.fisher_type == "empirical":
            scale = float(self.examples_seen) ** 2
            if grad_scale is not None:
                scale = scale / grad_scale**2
        for name, state in self.layers.items():
            state.factors.finish()
            sums = state.batch_sums(scale) if state.factors.count else None
            if sums is None:
                missing.append(name)
                continue
            converted = {key: t.to(self.factor_dtype) for key, t in sums.items()}
            out[name] = (converted, float(state.factors.count))
        if missing and not self._warned_missing:
            warnings.warn(
                f"K-FAC layers recorded no statistics this step: {', '.join(missing)} (not used in "
                "forward, or no "
                "backward reached them); they keep their raw gradients. Skip them with skip_layers "
                "to silence this.",
                stacklevel=3,
            )
            self._warned_missing = True
        return out

    def reduce_factors(self, batch: BatchStatistics) -> None:
        """Hook for data parallelism: sum the factor sums and counts over ranks (no-op in one
        process)."""

    def _update_running_factors(self, batch: BatchStatistics) -> None:
        """Fold the batch into the running factors; a non-finite batch (or one with no examples,
        which data parallelism can send) leaves them as they were. Decided on the device, so no
        host read, except once for a layer's first statistics: whether it has factors at all."""
        if not batch:
            return
        names = list(batch)
        # A layer's statistics are non-finite iff their entry sum is (barring an overflow to inf,
        # equally unusable).
        totals = torch.stack(
            [torch.stack([t.sum() for t in batch[n][0].values()]).sum() for n in names]
        )
        counts = _as_device_vector([c for _, c in batch.values()], totals)
        finite = torch.isfinite(totals)
        self._count_nonfinite("nonfinite_factors", finite)
        usable = finite & (counts > 0)
        fresh = [k for k, n in enumerate(names) if not self.layers[n].has_factors]
        first_usable = dict(zip(fresh, usable[fresh].tolist())) if fresh else {}
        # Per layer: a decay of 1 for an unusable batch (with zeros for its means) keeps the
        # running factors bit for bit.
        decay = torch.full_like(totals, self.factor_decay, dtype=self.factor_dtype)
        decays = torch.where(usable, decay, 1.0)
        examples = counts.clamp_min(1)
        for k, name in enumerate(names):
            state, ok = self.layers[name], usable[k]
            sums = batch[name][0]
            means = {key: torch.where(ok, t / examples[k], 0.0) for key, t in sums.items()}
            if not state.has_factors:
                if first_usable[k]:
                    state.update(means, 0.0)
                continue
            state.update(means, decays[k])

    def _count_nonfinite(self, counter: str, finite: torch.Tensor) -> None:
        """Count the False entries of ``finite`` (per layer) as faults, or under loss scaling
        as this step's overflow (an fp16 overflow, which the GradScaler skips: no fault)."""
        if not self._scaled:
            self.counters.add_failures(counter, finite)
        else:
            overflow = ~finite.all()
            self._overflow = overflow if self._overflow is None else self._overflow | overflow

    def remove(self) -> None:
        """Detach K-FAC from the model for good."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._model = None

    @property
    def device(self) -> torch.device:
        """Where the model's registered layers live now: every tensor K-FAC makes goes there."""
        first = next(iter(self.layers.values()), None)
        return first.factors.module.weight.device if first is not None else torch.device("cpu")
