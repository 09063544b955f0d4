"""torch.distributed collectives whose failure (a dead or hung peer) becomes one clear error.

Used by the trainer's process group and by K-FAC's distributed preconditioner alike, so it sits at
the bottom of the layering beside errors.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from bigbatch.errors import CollectiveError


def _collective_error(
    what: str, rank: int, timeout_s: float | None, exc: BaseException
) -> CollectiveError:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    limit = (
        f"timeout {timeout_s:g}s, runtime.dist_timeout"
        if timeout_s is not None
        else "see runtime.dist_timeout"
    )
    return CollectiveError(
        f"{what} failed on rank {rank}: {type(exc).__name__}: {first_line}. Another rank died or "
        f"hung ({limit}); "
        "restart the whole job with --resume to continue from the last checkpoint"
    )


def run_collective(
    what: str, rank: int, timeout_s: float | None, op: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``op(*args, **kwargs)``, a torch.distributed collective (or a function of several); its
    failure, which
    means another rank died or hung, becomes a CollectiveError naming ``what`` and the fix."""
    try:
        return op(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        raise _collective_error(what, rank, timeout_s, exc) from None
