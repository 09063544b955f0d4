"""K-FAC: Kronecker-factored natural-gradient preconditioning for Linear and Conv2d layers."""

from bigbatch.optim.kfac.preconditioner import KFACPreconditioner

__all__ = ["KFACPreconditioner"]
