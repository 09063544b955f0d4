"""K-FAC preconditioner that sits beside a torch.optim optimizer:

    loss.backward(); kfac.step(lr=lr); optimizer.step()

``step`` replaces the gradients of every registered Linear/Conv2d layer with (F + damping)^-1 grad,
F = kron(G, A) per layer (see layers.py for the scale convention), and with ``batchnorm="unit"``
those of BatchNorm's (gamma, beta) with per-channel 2x2 Fisher blocks (batchnorm.py). Momentum,
weight decay and the LR schedule stay the optimizer's: weight decay is added by SGD after
preconditioning.

Schedules: statistics are collected on steps where ``step_count % factor_interval == 0`` and folded
into running averages F <- decay * F + (1 - decay) * F_batch (the weight ``decay`` is on the OLD
value; the first batch initializes F). Eigendecompositions (or inverses) are recomputed on steps
where ``step_count % inverse_interval == 0``. Damping:
  * inverse_method="eigen", pi_damping=False (default): exact Tikhonov damping of the Kronecker
    product, (G (x) A + damping I)^-1, through the eigenvalues g_i a_j + damping;
  * pi_damping=True: the factored split (A + pi sqrt(d) I) (x) (G + sqrt(d)/pi I) of Martens &
    Grosse (2015, sec 6.3), pi = sqrt((tr A / dim A) / (tr G / dim G)) from the factors being
    decomposed: the factor with the larger mean eigenvalue takes the larger share;
    "inverse" always uses this split (with pi = 1 unless pi_damping), through Cholesky inverses.
KL-clipping (Ba et al. 2017) scales all preconditioned gradients by
min(1, sqrt(kl_clip / (lr^2 sum_layers <F^-1 g, g>))).

Fisher types: "empirical" uses the gradients of whatever loss the user backpropagates (Mixup's
mixed-target loss included); "mc" samples labels from the model's own softmax (seeded) and takes one
extra backward per micro-batch on statistics steps: call ``accumulate_mc_fisher(logits)`` after each
forward, before the loss's backward.

Subsampled statistics: with ``stats_fraction`` < 1, the first ceil(fraction * n) examples of every
forward pass (each micro-batch of n) contribute to A and G; batches are shuffled, so that is a
uniform subsample of the step's batch. The gradient itself always uses the whole batch.
"""

from __future__ import annotations

import dataclasses
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
from bigbatch.optim.kfac.layers import autocast_off, make_layer_factors
from bigbatch.optim.kfac.state import Damping, LayerState

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


class KFACPreconditioner:
    """Keyword options are KFACConfig's fields (bigbatch/config/schema.py: defaults and meaning),
    checked by the same validation as the config file; ``seed`` seeds the MC Fisher's labels."""

    def __init__(
        self,
        model: nn.Module,
        options: KFACConfig | None = None,
        *,
        seed: int = 0,
        factor_dtype: torch.dtype = torch.float32,
        **overrides: Any,
    ):
        unknown = set(overrides) - {f.name for f in dataclasses.fields(KFACConfig)}
        if unknown:
            raise TypeError(f"KFACPreconditioner got unknown options {sorted(unknown)}")
        options = dataclasses.replace(options or KFACConfig(), **overrides)
        options.validate(section="")
        self.options = options
        self.damping = options.damping
        self.factor_decay = options.factor_decay
        self.factor_interval = options.factor_interval
        self.inverse_interval = options.inverse_interval
        self.kl_clip = options.kl_clip
        self.fisher_type = options.fisher_type
        self.pi_damping = options.pi_damping
        self.inverse_method = options.inverse_method
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
        self._warned_resolution = False
        self._scaled = False
        self._overflow: torch.Tensor | None = (
            None  # whether this step's scaled gradients overflowed
        )
        self._handles = [
            state.factors.module.register_forward_hook(self._forward_hook(state.factors))
            for state in self.layers.values()
        ]
        self._handles.append(model.register_forward_pre_hook(self._count_examples))

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

    # -- the step --------------------------------------------------------------------------------
    def step(self, lr: float | None = None, grad_scale: float | torch.Tensor | None = None) -> None:
        """Precondition the gradients (already unscaled); ``grad_scale``: the loss scale of a
        GradScaler, which the output gradients the statistics saw still carry."""
        with autocast_off(self.device.type):
            self._step(lr, grad_scale)

    def _step(self, lr: float | None, grad_scale: float | torch.Tensor | None) -> None:
        self._scaled = grad_scale is not None
        self._overflow = None
        device = self.device
        if self.collecting:
            with self.times.measure("statistics", device):
                batch = self._batch_factors(grad_scale)
            self.reduce_factors(batch)
            with self.times.measure("statistics", device):
                self._update_running_factors(batch)
        if self.steps % self.inverse_interval == 0 or any(
            self.needs_decomposition(s) for s in self.layers.values()
        ):
            self.compute_decompositions([s for s in self.layers.values() if s.has_factors])
        with self.times.measure("preconditioning", device):
            self._precondition(lr)
        if self._overflow is not None:  # one overflow per step, however many layers show it
            self.counters.add("scaled_overflow_steps", self._overflow)
        self.steps += 1
        self.examples_seen = 0
        for state in self.layers.values():
            state.factors.reset()

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
        self._count_nonfinite("nonfinite_factors", (finite == 0).sum())
        usable = finite & (counts > 0)
        fresh = [k for k, n in enumerate(names) if not self.layers[n].has_factors]
        first_usable = dict(zip(fresh, usable[fresh].tolist())) if fresh else {}
        keep = torch.ones((), dtype=self.factor_dtype, device=totals.device)
        for k, name in enumerate(names):
            state, ok = self.layers[name], usable[k]
            means = {
                key: torch.where(ok, t / counts[k].clamp_min(1), 0.0)
                for key, t in batch[name][0].items()
            }
            if not state.has_factors:
                if first_usable[k]:
                    state.update(means, 0.0)
                continue
            # A decay of 1 and a zero batch keep the running factors bit for bit.
            state.update(means, torch.where(ok, keep * self.factor_decay, keep))

    # -- decompositions ------------------------------------------------------------------------
    def compute_decompositions(self, states: list[BlockState]) -> None:
        """Hook for data parallelism (assign layers to ranks, broadcast); here every layer
        locally."""
        with self.times.measure("eigendecomposition", self.device):
            for state in states:
                self.decompose(state)

    @property
    def damping_rule(self) -> Damping:
        """Read at each use, so that a changed ``damping`` takes effect at the next solve."""
        return Damping(self.inverse_method, self.damping, self.pi_damping)

    def decompose(self, state: BlockState) -> None:
        """Recompute the layer's decomposition; a failure keeps the previous one (or none: the
        raw gradient) and is counted."""
        if state.damping_below_resolution(self.damping_rule):
            self.counters.add("damping_below_resolution", 1)
            if not self._warned_resolution:
                warnings.warn(
                    f"kfac.damping={self.damping:g} is below the {self.factor_dtype} resolution of "
                    f"the factors of layer '{state.factors.name}': its updates along directions "
                    "without data are rounding noise divided by the damping, far too large. Raise "
                    "kfac.damping (1e-4 to 1e-2 of the factors' scale is usual) or use float64 "
                    "factors; counted as kfac_damping_below_resolution",
                    stacklevel=3,
                )
                self._warned_resolution = True
        retries, ok = state.decompose(self.damping_rule)
        self.counters.add("eigh_retries", retries)
        self.counters.add("eigh_failures", int(not ok))

    def solve(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """(F + damping)^-1 v for layer ``name``'s current factors and a gradient-shaped matrix v
        ([g_dim, a_dim] with weight rows and the bias last; [channels, 2] for BatchNorm)."""
        state = self.layers[name]
        if state.decomposition is None:
            self.decompose(state)
        return state.solve(v, self.damping_rule)

    def solutions(self) -> list[tuple[BlockState, torch.Tensor, torch.Tensor]]:
        """(layer, raw gradient matrix, solution) for every layer this step preconditions; here
        each layer with a decomposition solves its own (sharded data parallelism overrides)."""
        rule = self.damping_rule
        out = []
        for state in self.layers.values():
            if state.decomposition is None or not state.factors.has_grad():
                continue
            v = state.factors.grad_matrix()
            out.append((state, v, state.solve(v.to(self.factor_dtype), rule).to(v.dtype)))
        return out

    def needs_decomposition(self, state: BlockState) -> bool:
        """A layer with factors but no decomposition yet is decomposed at once."""
        return state.decomposition is None and state.has_factors

    def _precondition(self, lr: float | None) -> None:
        solved = self.solutions()
        if not solved:
            return
        # <F^-1 g, g> per layer: KL-clipping's sum, and the finiteness check (for a finite g it is
        # non-finite iff the solution is). Decided on the device: no host read.
        products = torch.stack([torch.dot(x.reshape(-1), v.reshape(-1)) for _, v, x in solved])
        finite = torch.isfinite(products)
        self._count_nonfinite("nonfinite_updates", (finite == 0).sum())
        nu = torch.ones((), dtype=products.dtype, device=products.device)
        if self.kl_clip > 0 and lr is not None:
            total = torch.where(finite, products, 0.0).sum() * lr**2
            # Where the sum is not positive there is nothing to clip.
            nu = torch.where(total > 0, (self.kl_clip / total).sqrt().clamp(max=1.0), nu)
        for k, (state, v, x) in enumerate(solved):
            # A non-finite solution leaves the layer its raw gradient.
            state.factors.set_grad_matrix(torch.where(finite[k], x * nu.to(x.dtype), v))

    def _count_nonfinite(self, counter: str, n: torch.Tensor) -> None:
        if not self._scaled:
            self.counters.add(counter, n)
        else:  # an fp16 overflow, which the GradScaler skips: no fault
            overflow = n > 0
            self._overflow = overflow if self._overflow is None else self._overflow | overflow

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def health(self) -> dict[str, int]:
        """The run's health counters (reading them synchronizes with the device)."""
        return self.counters.read()

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per part since the last reset_metrics()."""
        return self.times.read()

    def metrics(self) -> dict[str, float]:
        """Seconds per part since the last reset_metrics(), and the health counters of the run."""
        out: dict[str, float] = {f"kfac_{k}_time": v for k, v in self.timings.items()}
        out.update({f"kfac_{k}": v for k, v in self.health.items()})
        return out

    def reset_metrics(self) -> None:
        """Start a new measuring period (e.g. an epoch); health counters stay cumulative."""
        self.times.reset()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def device(self) -> torch.device:
        """Where the model's registered layers live now: every tensor K-FAC makes goes there."""
        first = next(iter(self.layers.values()), None)
        return first.factors.module.weight.device if first is not None else torch.device("cpu")

    def state_dict(self) -> dict[str, Any]:
        """Copies, so that later steps do not change a state that was saved or handed on."""

        return {
            "steps": self.steps,
            "health": dict(self.health),
            "mc_generator": None if self.mc_generator is None else self.mc_generator.get_state(),
            "mc_generator_device": None if self.mc_generator is None else str(self.device),
            "layers": {name: s.state_dict() for name, s in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores copies on the model's current device, whatever device the state was saved on."""
        unknown = set(state["layers"]) - set(self.layers)
        if unknown:
            raise ValueError(
                f"K-FAC state has layers {sorted(unknown)} that this model does not register"
            )
        self.steps = state["steps"]
        self.counters.load(state["health"])
        # The generator resumes exactly on the device type it was saved from; on another it is
        # reseeded from (seed, step) when first used.
        self.mc_generator = None
        saved = state.get("mc_generator")
        if saved is not None and torch.device(state.get("mc_generator_device") or "cpu").type == (
            self.device.type
        ):
            self.mc_generator = torch.Generator(self.device)
            self.mc_generator.set_state(saved)
        for name, s in state["layers"].items():
            self.layers[name].load_state_dict(s, self.device)
