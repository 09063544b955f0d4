"""bigbatch: large mini-batch training with K-FAC, Mixup and flatness analysis."""

__version__ = "0.1.0"
