"""Checks of the optimizer choices beyond SGD (LARS, LAMB, Muon, SAM) and of ghost BatchNorm."""

from __future__ import annotations

from bigbatch.config.checks import choice, require
from bigbatch.config.schema import MUON_LR_ADJUSTMENTS, MUON_REST_OPTIMIZERS, Config

# torch.optim.Muon refuses 100 or more Newton-Schulz steps.
MAX_NS_STEPS = 99


def check_optimizer_options(cfg: Config) -> None:
    o = cfg.optimizer
    require(o.lars_trust > 0, "optimizer.lars_trust", f"must be > 0, got {o.lars_trust}")
    require(0 <= o.beta1 < 1, "optimizer.beta1", f"must be in [0, 1), got {o.beta1}")
    require(0 <= o.beta2 < 1, "optimizer.beta2", f"must be in [0, 1), got {o.beta2}")
    require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
    require(
        1 <= o.muon_ns_steps <= MAX_NS_STEPS,
        "optimizer.muon_ns_steps",
        f"must be in [1, {MAX_NS_STEPS}], got {o.muon_ns_steps} (its authors use 5)",
    )
    choice(o.muon_adjust_lr, "optimizer.muon_adjust_lr", MUON_LR_ADJUSTMENTS)
    choice(o.muon_rest, "optimizer.muon_rest", MUON_REST_OPTIMIZERS)
    require(o.muon_rest_lr > 0, "optimizer.muon_rest_lr", f"must be > 0, got {o.muon_rest_lr}")
    require(
        o.sam_rho >= 0,
        "optimizer.sam_rho",
        f"must be > 0 to enable SAM or 0 to disable it, got {o.sam_rho}",
    )
    require(
        o.sam_rho == 0 or o.name != "kfac",
        "optimizer.sam_rho",
        "cannot wrap optimizer.name='kfac': SAM's second pass at the perturbed weights would feed "
        "K-FAC's curvature statistics (its hooks see every forward and backward); set "
        "optimizer.sam_rho=0, or use SAM with sgd, lars, lamb or muon",
    )


def check_ghost_batch_norm(cfg: Config) -> None:
    ghost = cfg.model.ghost_batch_size
    require(ghost >= 0, "model.ghost_batch_size", f"must be >= 0 (0 disables), got {ghost}")
    if ghost == 0:
        return
    require(
        cfg.model.name != "lenet5",
        "model.ghost_batch_size",
        f"is {ghost} but lenet5 has no BatchNorm to apply it to; set it to 0 or choose a resnet",
    )
    micro = cfg.runtime.micro_batch_size
    require(
        micro == 0 or micro % ghost == 0,
        "runtime.micro_batch_size",
        f"is {micro}, not a multiple of model.ghost_batch_size ({ghost}): a ghost batch would be "
        f"cut in two; use a multiple of {ghost} or 0 (automatic)",
    )
