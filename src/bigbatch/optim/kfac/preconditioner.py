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
import warnings
from typing import Any

import torch
from torch import nn

from bigbatch.config import KFACConfig
from bigbatch.optim.kfac.adaptive import AdaptiveDamping, LossOfRows
from bigbatch.optim.kfac.layers import full_precision
from bigbatch.optim.kfac.state import Damping
from bigbatch.optim.kfac.statistics import BlockState, FactorStatistics


class KFACPreconditioner(FactorStatistics):
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
        super().__init__(model, options, seed, factor_dtype)
        self.damping = options.damping
        self.inverse_interval = options.inverse_interval
        self.kl_clip = options.kl_clip
        self.pi_damping = options.pi_damping
        self.inverse_method = options.inverse_method
        self._warned_resolution = False
        self.adaptive = (
            AdaptiveDamping(options.adaptive_interval, options.min_damping, options.max_damping)
            if options.adaptive_damping
            else None
        )

    # -- the step --------------------------------------------------------------------------------
    def step(self, lr: float | None = None, grad_scale: float | torch.Tensor | None = None) -> None:
        """Precondition the gradients (already unscaled); ``grad_scale``: the loss scale of a
        GradScaler, which the output gradients the statistics saw still carry."""
        with full_precision(self.device.type):
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
        self.sync_hooks()
        self.examples_seen = 0
        for state in self.layers.values():
            state.factors.reset()

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

    def set_damping(self, value: float) -> None:
        """A new damping, in effect from the next solve (through the cached eigenvalue scales;
        the inverse method's damped inverses take it at their next decomposition)."""
        self.damping = value
        rule = self.damping_rule
        for state in self.layers.values():
            if state.decomposition is not None:
                state.refresh(rule)

    def adaptation_due(self) -> bool:
        """Whether this step's damping adaptation needs ``AdaptiveDamping.capture`` before it."""
        return self.adaptive is not None and self.adaptive.due(self.steps)

    def adapt_damping(
        self,
        model: nn.Module,
        x: torch.Tensor,
        loss_of_rows: LossOfRows,
        before: dict[str, tuple[torch.Tensor, torch.Tensor]],
        weight_decay: float,
        micro: int,
        all_sum: Any = None,
    ) -> None:
        """After the optimizer's step: judge it (adaptive.py) and move the damping."""
        assert self.adaptive is not None
        rho = self.adaptive.reduction_ratio(
            model,
            x,
            loss_of_rows,
            before,
            self.damping,
            weight_decay,
            micro,
            *(() if all_sum is None else (all_sum,)),
        )
        self.set_damping(self.adaptive.adjusted(self.damping, rho))

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
        self._count_nonfinite("nonfinite_updates", finite)
        if self.kl_clip > 0 and lr is not None:
            # Non-finite layers left out; a zero sum gives kl / 0 = inf, which clamps to 1.
            total = products.nan_to_num(0.0, 0.0, 0.0).sum().clamp_min(0.0)
            nu = ((self.kl_clip / lr**2) / total).sqrt().clamp(max=1.0)
            torch._foreach_mul_([x for _, _, x in solved], nu)
        parts = []
        for ok, (state, v, x) in zip(finite.unbind(), solved):
            # A non-finite solution leaves the layer its raw gradient.
            parts += state.factors.grad_parts(torch.where(ok, x, v, out=x))
        grads, sources = zip(*parts)
        torch._foreach_copy_(list(grads), list(sources))

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
        """Seconds per part since the last reset_metrics(), the health counters of the run, the
        damping now and (adaptive) the mean reduction ratio of the period."""
        out: dict[str, float] = {f"kfac_{k}_time": v for k, v in self.timings.items()}
        out.update({f"kfac_{k}": v for k, v in self.health.items()})
        out["kfac_damping"] = self.damping
        if self.adaptive is not None and self.adaptive.ratios:
            ratios = self.adaptive.ratios
            out["kfac_reduction_ratio"] = sum(ratios) / len(ratios)
        return out

    def reset_metrics(self) -> None:
        """Start a new measuring period (e.g. an epoch); health counters stay cumulative."""
        self.times.reset()
        if self.adaptive is not None:
            self.adaptive.ratios.clear()

    def state_dict(self) -> dict[str, Any]:
        """Copies, so that later steps do not change a state that was saved or handed on."""

        return {
            "steps": self.steps,
            "damping": self.damping,
            "health": dict(self.health),
            "mc_generator": None if self.mc_generator is None else self.mc_generator.get_state(),
            "mc_generator_device": None if self.mc_generator is None else str(self.device),
            "layers": {name: s.state_dict() for name, s in self.layers.items()},
        }

    def checkpoint_state(self) -> dict[str, Any] | None:
        """What a checkpoint holds: state_dict() here; with data parallelism a collective that
        returns the whole state on rank 0 (None elsewhere)."""
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores copies on the model's current device, whatever device the state was saved on."""
        unknown = set(state["layers"]) - set(self.layers)
        if unknown:
            raise ValueError(
                f"K-FAC state has layers {sorted(unknown)} that this model does not register"
            )
        self.steps = state["steps"]
        self.sync_hooks()
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
        if self.adaptive is not None and "damping" in state:
            self.set_damping(state["damping"])  # where the adaptation had taken it
