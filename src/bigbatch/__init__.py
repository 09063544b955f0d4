"""bigbatch: large mini-batch training with K-FAC, Mixup and flatness analysis.

The public API, for use from your own code (examples/ shows it in full):

    from bigbatch import KFACPreconditioner, LeNet5, load_dataset, BatchLoader
    kfac = KFACPreconditioner(model, damping=1e-2)
    loss.backward(); kfac.step(lr=lr); optimizer.step()

Names are imported on first use, so ``bigbatch --help`` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "Config": "bigbatch.config",
    "KFACConfig": "bigbatch.config",
    "load_config": "bigbatch.config",
    "ImageDataset": "bigbatch.data",
    "load_dataset": "bigbatch.data",
    "BatchLoader": "bigbatch.data.batches",
    "channel_stats": "bigbatch.data.batches",
    "LeNet5": "bigbatch.models",
    "CifarResNet": "bigbatch.models",
    "build_model": "bigbatch.models",
    "GhostBatchNorm2d": "bigbatch.models",
    "KFACPreconditioner": "bigbatch.optim.kfac",
    "LRSchedule": "bigbatch.optim.schedules",
    "LARS": "bigbatch.optim.lars",
    "LAMB": "bigbatch.optim.lamb",
    "MatrixMuon": "bigbatch.optim.muon",
    "build_optimizer": "bigbatch.optim.optimizers",
    "BatchMixer": "bigbatch.augment.mixup",
    "mixed_cross_entropy": "bigbatch.augment.mixup",
    "Trainer": "bigbatch.train.trainer",
    "SAM": "bigbatch.train.sam",
    "random_direction": "bigbatch.analysis.landscape",
    "evaluate_along": "bigbatch.analysis.landscape",
    "lanczos_top_eigenvalues": "bigbatch.analysis.hessian",
    "hutchinson_trace": "bigbatch.analysis.hessian",
    "epsilon_sharpness": "bigbatch.analysis.sharpness",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bigbatch' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
