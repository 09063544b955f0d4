"""``build_optimizer``: the torch.optim optimizer ``optimizer.name`` stands for.

sgd and kfac: torch.optim.SGD (K-FAC preconditions its gradients beforehand); lars and lamb: the
papers' algorithms (lars.py, lamb.py); muon: torch.optim.Muon on conv and hidden Linear weights
with SGD or AdamW on the rest (biases, BatchNorm parameters and the classifier head, the last
Linear layer), as Muon's authors prescribe. A parameter group whose rate differs from
``optimizer.lr`` carries ``lr_scale``: the schedule sets ``group["lr"] = lr * lr_scale``
(``group_lr``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bigbatch.config.schema import OptimizerConfig
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.muon import CombinedOptimizer, MatrixMuon


def group_lr(group: dict[str, Any], lr: float) -> float:
    """The rate of ``group`` when the schedule's rate is ``lr``."""
    return lr * group.get("lr_scale", 1.0)


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.name in ("sgd", "kfac"):
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    if cfg.name == "lars":
        return LARS(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.lars_trust,
            nesterov=cfg.nesterov,
            exclude_1d=cfg.exclude_1d,
        )
    if cfg.name == "lamb":
        return LAMB(
            params,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            exclude_1d=cfg.exclude_1d,
        )
    if cfg.name == "muon":
        return _muon(cfg, model)
    raise ValueError(f"unknown optimizer.name '{cfg.name}'")


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's weights, the rest): weights of 2+ dimensions but the classifier head's."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    matrices: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in model.parameters():
        (matrices if p.ndim >= 2 and id(p) not in head else rest).append(p)
    return matrices, rest


def _muon(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    matrices, rest = muon_split(model)
    parts: list[torch.optim.Optimizer] = []
    if matrices:
        parts.append(
            MatrixMuon(
                matrices,
                lr=cfg.lr,
                momentum=cfg.momentum,
                nesterov=cfg.nesterov,
                weight_decay=cfg.weight_decay,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    if rest:
        group = [{"params": rest, "lr_scale": cfg.muon_rest_lr / cfg.lr}]
        if cfg.muon_rest == "adamw":
            parts.append(
                torch.optim.AdamW(
                    group,
                    lr=cfg.muon_rest_lr,
                    betas=(cfg.beta1, cfg.beta2),
                    eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                )
            )
        else:
            parts.append(
                torch.optim.SGD(
                    group,
                    lr=cfg.muon_rest_lr,
                    momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay,
                    nesterov=cfg.nesterov,
                )
            )
    return CombinedOptimizer(parts)
