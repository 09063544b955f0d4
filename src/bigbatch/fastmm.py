"""Dense products on the CPU through oneDNN's GEMM where torch's own BLAS call is slower.

torch's CPU ``matmul`` and ``F.linear`` call MKL, which on AMD CPUs does not take its AVX-512 path:
on the development machine (AMD EPYC, one thread) [120 x 401] @ [401 x 401], K-FAC's largest
per-step product for LeNet-5, takes 0.36 ms through MKL and 0.17 ms through oneDNN, and LeNet-5's
fc1 at batch 128 0.12 against 0.066 ms. oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise``,
a private op of torch's CPU compiler backend (torch is pinned in pyproject.toml). It is used only for
2-D float32 CPU tensors when autograd is not recording them, checked against ``torch.matmul`` once, and any failure
falls back to torch's own call for the rest of the process. Results agree with MKL's to float32
rounding (the summation order differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_usable: bool | None = None  # decided on first use
# Below about this many multiply-adds oneDNN's per-call setup (~10-40 us measured) costs more than MKL.
MIN_MULTIPLY_ADDS = 2_000_000


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _check_usable() -> bool:
    global _usable
    if _usable is None:
        try:
            g = torch.Generator().manual_seed(0)
            a, b, bias = torch.randn(7, 5, generator=g), torch.randn(5, 3, generator=g), torch.randn(3, generator=g)
            # Both weight layouts matmul() passes: contiguous [out, in] and a transposed view.
            _usable = bool(torch.backends.mkldnn.is_available()) and all(
                torch.allclose(_onednn(a, w, bias), a @ b + bias, rtol=1e-5, atol=1e-5)
                for w in (b.t().contiguous(), b.t())
            )
        except (RuntimeError, AttributeError):
            _usable = False
    return _usable


def _eligible(*tensors: torch.Tensor | None) -> bool:
    recording = torch.is_grad_enabled()  # parameters require grad, but under no_grad/inference_mode nothing records
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and not (recording and t.requires_grad))
        for t in tensors
    ) and _check_usable()


def _dense(t: torch.Tensor) -> bool:
    """A matrix that is contiguous, or a transpose of a contiguous one. oneDNN takes other strides too,
    but measured about a second for a [96 x 2048] @ [2048 x 480] product whose operand rows lay further
    apart than their length (a reference kernel, presumably), against 0.5 ms dense."""
    return t.is_contiguous() or t.t().is_contiguous()


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether ``matmul`` and ``linear`` can take oneDNN for tensors like these (float32 CPU, not recorded
    by autograd) in this process; strided operands stay on torch's product whatever this says."""
    return _eligible(*tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for inference: x [n, in], weight [out, in]."""
    global _usable
    if (weight.dim() == 2 and x.dim() == 2 and _dense(x) and _dense(weight)
            and _prefers_onednn(x.shape[0], weight, bias) and _eligible(x)):
        try:
            return _onednn(x, weight, bias)
        except RuntimeError:
            _usable = False
    return F.linear(x, weight, bias)


def _prefers_onednn(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return rows * weight.shape[0] * weight.shape[1] >= MIN_MULTIPLY_ADDS and _eligible(weight, bias)


def prefers_onednn(rows: int, layer: torch.nn.Linear) -> bool:
    """Whether ``linear`` would take oneDNN for ``rows`` inputs to this layer (outside autograd)."""
    return _prefers_onednn(rows, layer.weight, layer.bias)


class OneDNNLinear(torch.nn.Module):
    """A Linear layer's product through oneDNN, scriptable (TorchScript) and sharing the layer's
    parameters; for inference where ``prefers_onednn`` said so."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a [m, k] and b [k, n] (either may be a transposed view)."""
    if a.dim() == 2 and b.dim() == 2:
        return linear(a, b.t())
    return a @ b
