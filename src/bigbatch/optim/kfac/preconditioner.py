"""K-FAC preconditioner that sits beside a torch.optim optimizer:

    loss.backward(); kfac.step(lr=lr); optimizer.step()

``step`` replaces the gradients of every registered Linear/Conv2d layer with (F + damping)^-1 grad,
F = kron(G, A) per layer (see layers.py for the scale convention). Momentum, weight decay and the LR
schedule stay the optimizer's: weight decay is added by SGD after preconditioning.

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
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.config import KFACConfig
from bigbatch.optim.kfac.layers import LayerFactors, autocast_off, make_layer_factors
from bigbatch.optim.kfac.state import Damping, LayerState

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
        self.layers: dict[str, LayerState] = {}
        for name, module in model.named_modules():
            if any(p.fullmatch(name) for p in patterns):
                continue
            factors = make_layer_factors(name, module)
            if factors is not None:
                self.layers[name] = LayerState(factors)
        if not self.layers:
            warnings.warn(
                "KFACPreconditioner found no Linear or Conv2d layer to precondition", stacklevel=2
            )

        self.steps = 0
        # Examples through the model since the last step (all, not only sampled).
        self.examples_seen = 0
        self.timings = dict.fromkeys(TIMING_PARTS, 0.0)
        self.health = dict.fromkeys(HEALTH_COUNTERS, 0)
        self._mc_outputs: list[tuple[LayerFactors, torch.Tensor]] = []
        self._warned_missing = False
        self._warned_resolution = False
        self._scaled = self._overflow_seen = False
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

    def _forward_hook(self, factors: LayerFactors):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and self.collecting):
                return
            start = time.perf_counter()
            x = inputs[0]
            k = self._sampled_rows(x.shape[0])
            factors.add_input(x[:k], sampled=k < x.shape[0])
            if self.fisher_type == "empirical":
                output.register_hook(lambda grad: self._grad_hook(factors, grad, k))
            else:
                self._mc_outputs.append((factors, output))
            self.timings["statistics"] += time.perf_counter() - start

        return hook

    def _grad_hook(self, factors: LayerFactors, grad: torch.Tensor, k: int) -> None:
        start = time.perf_counter()
        factors.add_output_grad(grad[:k], sampled=k < grad.shape[0])
        self.timings["statistics"] += time.perf_counter() - start

    def accumulate_mc_fisher(self, logits: torch.Tensor) -> None:
        """MC Fisher: backprop a loss with labels sampled from softmax(logits) to the layer outputs
        only."""
        if self.fisher_type != "mc" or not self._mc_outputs:
            self._mc_outputs.clear()
            return
        start = time.perf_counter()
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=1)
            sampled = torch.multinomial(probs, 1, generator=self._generator(probs.device))
            sampled = sampled.squeeze(1)
        # A sum of per-example losses: each output gradient is already that example's own gradient.
        loss = F.cross_entropy(logits, sampled, reduction="sum")
        outputs = [o for _, o in self._mc_outputs]
        grads = torch.autograd.grad(loss, outputs, retain_graph=True)
        for (factors, out), grad in zip(self._mc_outputs, grads):
            k = self._sampled_rows(out.shape[0])
            factors.add_output_grad(grad[:k], sampled=k < out.shape[0])
        self._mc_outputs.clear()
        self.timings["statistics"] += time.perf_counter() - start

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
        self._overflow_seen = False
        self._scaled = grad_scale is not None
        if self.collecting:
            start = time.perf_counter()
            batch = self._batch_factors(grad_scale)
            self.timings["statistics"] += time.perf_counter() - start
            self.reduce_factors(batch)
            start = time.perf_counter()
            self._update_running_factors(batch)
            self.timings["statistics"] += time.perf_counter() - start
        if self.steps % self.inverse_interval == 0 or any(
            s.decomposition is None and s.A is not None for s in self.layers.values()
        ):
            self.compute_decompositions([s for s in self.layers.values() if s.A is not None])
        start = time.perf_counter()
        self._precondition(lr)
        self.timings["preconditioning"] += time.perf_counter() - start
        self.steps += 1
        self.examples_seen = 0
        for state in self.layers.values():
            state.factors.reset()

    def _batch_factors(
        self, grad_scale: float | torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Per layer: (A sum, G sum, contributing examples), G scaled to per-example gradients."""
        out = {}
        missing = []
        # Empirical: hooks saw S g / N for a mean loss over N examples scaled by S (a GradScaler's,
        # else 1), so sum(g g^T) = (N / S)^2 * raw sum. The MC backward is never scaled.
        scale: float | torch.Tensor = 1.0
        if self.fisher_type == "empirical":
            scale = float(self.examples_seen) ** 2
            if grad_scale is not None:
                scale = scale / grad_scale**2
        for name, state in self.layers.items():
            f = state.factors
            f.finish()
            if f.a_sum is None or f.g_sum is None or f.count == 0:
                missing.append(name)
                continue
            out[name] = (
                f.a_sum.to(self.factor_dtype),
                f.g_sum.to(self.factor_dtype) * scale,
                float(f.count),
            )
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

    def reduce_factors(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Hook for data parallelism: sum the factor sums and counts over ranks (no-op in one
        process)."""

    def _update_running_factors(
        self, batch: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ) -> None:
        if not batch:
            return
        # A factor is non-finite iff its entry sum is (barring an overflow to inf, equally
        # unusable): one synchronization for all layers instead of two per layer.
        sums = torch.stack(
            [t.sum() for a_sum, g_sum, _ in batch.values() for t in (a_sum, g_sum)]
        ).tolist()
        for k, (name, (a_sum, g_sum, count)) in enumerate(batch.items()):
            if not (math.isfinite(sums[2 * k]) and math.isfinite(sums[2 * k + 1])):
                self._count_nonfinite("nonfinite_factors", 1)
                continue
            state = self.layers[name]
            a, g = a_sum / count, g_sum / count
            if state.A is None or state.G is None:
                state.A, state.G = a, g
            else:
                state.A.mul_(self.factor_decay).add_(a, alpha=1 - self.factor_decay)
                state.G.mul_(self.factor_decay).add_(g, alpha=1 - self.factor_decay)

    # -- decompositions ------------------------------------------------------------------------
    def compute_decompositions(self, states: list[LayerState]) -> None:
        """Hook for data parallelism (assign layers to ranks, broadcast); here every layer
        locally."""
        start = time.perf_counter()
        for state in states:
            self.decompose(state)
        self.timings["eigendecomposition"] += time.perf_counter() - start

    @property
    def damping_rule(self) -> Damping:
        """Read at each use, so that a changed ``damping`` takes effect at the next solve."""
        return Damping(self.inverse_method, self.damping, self.pi_damping)

    def decompose(self, state: LayerState) -> None:
        """Recompute the layer's decomposition; a failure keeps the previous one (or none: the
        raw gradient) and is counted."""
        if state.damping_below_resolution(self.damping_rule):
            self.health["damping_below_resolution"] += 1
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
        self.health["eigh_retries"] += retries
        self.health["eigh_failures"] += not ok

    def set_scale(self, state: LayerState) -> None:
        state.set_scale(self.damping_rule)

    def solve(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """(F + damping)^-1 v for layer ``name``'s current factors and a gradient-shaped matrix v
        [g_dim, a_dim] (weight rows, bias last)."""
        state = self.layers[name]
        if state.decomposition is None:
            self.decompose(state)
        return state.solve(v, self.damping_rule)

    def _precondition(self, lr: float | None) -> None:
        updates: list[tuple[LayerState, torch.Tensor]] = []
        products = []
        for state in self.layers.values():
            if state.decomposition is None or not state.factors.has_grad():
                continue
            v = state.factors.grad_matrix()
            x = state.solve(v.to(self.factor_dtype), self.damping_rule).to(v.dtype)
            updates.append((state, x))
            # <F^-1 g, g>: KL-clipping's sum, and the finiteness check (for a finite g it is
            # non-finite iff x is).
            products.append(torch.dot(x.reshape(-1), v.reshape(-1)))
        if not updates:
            return
        vg = torch.stack(products).tolist()  # one synchronization for all layers
        finite = [(state, x) for (state, x), p in zip(updates, vg) if math.isfinite(p)]
        # Those keep their raw gradient.
        self._count_nonfinite("nonfinite_updates", len(updates) - len(finite))
        nu = 1.0
        if self.kl_clip > 0 and lr is not None:
            vg_sum = sum(p for p in vg if math.isfinite(p)) * lr**2
            if vg_sum > 0:
                nu = min(1.0, math.sqrt(self.kl_clip / vg_sum))
        for state, x in finite:
            state.factors.set_grad_matrix(x.mul_(nu) if nu != 1.0 else x)

    def _count_nonfinite(self, counter: str, n: int) -> None:
        if not n:
            return
        if not self._scaled:
            self.health[counter] += n
        elif not self._overflow_seen:  # one overflow per step, however many layers show it
            self.health["scaled_overflow_steps"] += 1
            self._overflow_seen = True

    # -- bookkeeping -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Seconds per part since the last reset_metrics(), and the health counters of the run."""
        out: dict[str, float] = {f"kfac_{k}_time": v for k, v in self.timings.items()}
        out.update({f"kfac_{k}": v for k, v in self.health.items()})
        return out

    def reset_metrics(self) -> None:
        """Start a new measuring period (e.g. an epoch); health counters stay cumulative."""
        self.timings = dict.fromkeys(TIMING_PARTS, 0.0)

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
        self.health.update(state["health"])
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
