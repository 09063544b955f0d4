"""Loss landscapes around a solution: f(a) = L(theta* + a delta) in 1-D, a 2-D grid over two
directions, and linear interpolation between two solutions.

Directions are seeded Gaussians shaped like the parameters. Normalization "none" is the seed's plot;
"filter" is Li et al. (2018): each filter of delta (one output unit: a row of a Linear weight, one
output channel of a Conv2d weight) is rescaled to the norm of the same filter of theta*, and
one-dimensional parameters (biases, BatchNorm weights and biases) get a zero direction, as that
paper does by default, so the plot shows the effect of the filters only.
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import fastmm

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
NORMALIZATIONS = ("none", "filter")


def random_direction(model: nn.Module, seed: int, normalization: str = "none") -> list[torch.Tensor]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown direction normalization '{normalization}'; choose one of {NORMALIZATIONS}")
    g = torch.Generator().manual_seed(seed)
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if normalization == "filter":
            if p.dim() <= 1:
                d.zero_()
            else:
                theta = p.detach().flatten(1).norm(dim=1)
                scale = theta / d.flatten(1).norm(dim=1).clamp_min(1e-12)
                d.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
        direction.append(d.to(p.device))
    return direction


def difference_direction(start: nn.Module, end: nn.Module) -> list[torch.Tensor]:
    """delta = theta_end - theta_start: the straight line between two solutions (a=0 start, a=1 end)."""
    return [(b.detach() - a.detach()) for a, b in zip(start.parameters(), end.parameters())]


@torch.inference_mode()
def evaluate_loss(model: nn.Module, batches: Batches) -> tuple[float, float]:
    loss_sum, hits, total = 0.0, 0, 0
    for x, y in batches():
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hits += int((logits.argmax(1) == y).sum())
        total += y.shape[0]
    return loss_sum / total, hits / total


def _input_layer(model: nn.Module, x: torch.Tensor) -> nn.Module | bool:
    """The first Conv2d/Linear if the model applies it to its input itself; otherwise False."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        return False
    probe = x[:1]
    seen: list[bool] = []
    handle = first.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0] is probe))
    try:
        model(probe)
    finally:
        handle.remove()
    return first if seen == [True] else False


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)  # the layer's own convolution (PhaseConv2d's layout)
    return F.linear(x, weight, bias)


def _fast_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return fastmm.linear(x, module.weight, module.bias)


def _flatten_parameters(replica: nn.Module) -> torch.Tensor:
    """Make the replica's parameters (contiguous) views of one flat buffer: moving to a point is one add."""
    params = list(replica.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return flat


def _first_layer_outputs(
    replica: nn.Module, first: nn.Module, origin: list[torch.Tensor], directions: Sequence[Sequence[torch.Tensor]],
    x: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first layer's output at the origin and, without its bias, along each direction."""
    index = {id(p): i for i, p in enumerate(replica.parameters())}
    wi = index[id(first.weight)]
    bi = index[id(first.bias)] if first.bias is not None else None
    base = _layer_output(first, x, origin[wi], origin[bi] if bi is not None else None)
    return base, [_layer_output(first, x, d[wi], d[bi] if bi is not None else None) for d in directions]


class _ScriptedPoints(nn.Module):
    """One batch at every point, as TorchScript: the ops run back to back in C++ and release Python's
    GIL, so worker threads no longer queue for it between ops (LeNet-5, two workers: 3.1 against 3.9
    us per image and point). The same ops as ``_point_results`` (results equal to the last bit,
    tested); ``rest`` is the model traced with its first layer replaced by the given output, ``flat``
    the buffer its parameters are views of."""

    def __init__(self, rest: torch.jit.ScriptModule, flat: torch.Tensor, origin_flat: torch.Tensor,
                 direction_flats: list[torch.Tensor]):
        super().__init__()
        self.rest, self.flat, self.origin_flat, self.direction_flats = rest, flat, origin_flat, direction_flats

    def forward(self, base: torch.Tensor, outputs: list[torch.Tensor], points: list[list[float]],
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty_like(base)
        losses: list[torch.Tensor] = []
        hits: list[torch.Tensor] = []
        for coeffs in points:
            torch.add(self.origin_flat, self.direction_flats[0], alpha=coeffs[0], out=self.flat)
            torch.add(base, outputs[0], alpha=coeffs[0], out=buffer)
            for i in range(1, len(coeffs)):
                self.flat.add_(self.direction_flats[i], alpha=coeffs[i])
                buffer.add_(outputs[i], alpha=coeffs[i])
            logits = self.rest(buffer)
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            hits.append((logits.argmax(1) == y).sum())
        return torch.stack(losses), torch.stack(hits)


_SCRIPTING = threading.Lock()  # tracing and scripting, one thread at a time (see _script_points)


def _given_output(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape)  # an op, not the input itself: the tracer rejects a module that returns its input


def _script_points(model: nn.Module, first_name: str, origin_flat: torch.Tensor, direction_flats: list[torch.Tensor],
                   base: torch.Tensor) -> torch.jit.ScriptModule:
    """``_ScriptedPoints`` for first-layer outputs shaped like ``base`` (the trace is for that shape)."""
    rest = copy.deepcopy(model)
    flat = _flatten_parameters(rest)
    for p in rest.parameters():
        p.requires_grad_(False)
    # The first layer hands on the output it is given; an instance of a subclass, so that the model's
    # forward treats it as before (LeNet-5 checks for a PhaseConv2d).
    first = rest.get_submodule(first_name)
    first.__class__ = type(f"Given{type(first).__name__}", (type(first),), {"forward": _given_output})
    # catch_warnings changes process-wide state: one thread at a time, or a filter could outlive it.
    with _SCRIPTING, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the tracer's notes on shapes
        for name, module in list(rest.named_modules()):
            if type(module) is nn.Linear and fastmm.prefers_onednn(base.shape[0], module):
                parent, _, attr = name.rpartition(".")
                setattr(rest.get_submodule(parent), attr, torch.jit.script(fastmm.OneDNNLinear(module)))
        traced = torch.jit.trace(rest, (base,), check_trace=False)
        return torch.jit.script(_ScriptedPoints(traced, flat, origin_flat, direction_flats))


def _point_results(
    replica: nn.Module,
    flat: torch.Tensor,
    first: nn.Module | None,
    origin: list[torch.Tensor],
    directions: Sequence[Sequence[torch.Tensor]],
    origin_flat: torch.Tensor,
    direction_flats: list[torch.Tensor],
    points: Sequence[Sequence[float]],
    x: torch.Tensor,
    y: torch.Tensor,
) -> list[tuple[float, int, int]]:
    """(loss sum, correct, count) of one batch at every point, on a replica whose parameters (views of
    ``flat``) it overwrites; ``origin_flat`` and ``direction_flats`` are origin and directions flattened."""
    outputs = None
    if first is not None:
        base, outputs = _first_layer_outputs(replica, first, origin, directions, x)
        buffer = torch.empty_like(base)
    results = []
    for coeffs in points:
        torch.add(origin_flat, direction_flats[0], alpha=coeffs[0], out=flat)
        for c, d in zip(coeffs[1:], direction_flats[1:]):
            flat.add_(d, alpha=c)
        if outputs is not None:
            out = torch.add(base, outputs[0], alpha=coeffs[0], out=buffer)  # reused: no page faults per point
            for c, o in zip(coeffs[1:], outputs[1:]):
                out.add_(o, alpha=c)
            first.forward = lambda _x, out=out: out  # type: ignore[method-assign]
        try:
            logits = replica(x)
        finally:
            if outputs is not None:
                del first.forward
        results.append((float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()), y.shape[0]))
    return results


class _Replica:
    """One worker's copy of the model: evaluates whole batches at every point."""

    def __init__(self, model: nn.Module, origin: list[torch.Tensor], directions: Sequence[Sequence[torch.Tensor]],
                 points: Sequence[Sequence[float]]):
        self.source = model
        self.model = copy.deepcopy(model)
        self.flat = _flatten_parameters(self.model)
        for module in self.model.modules():
            if type(module) is nn.Linear:  # oneDNN's GEMM: LeNet-5's fc1 in half MKL's time here
                module.forward = functools.partial(_fast_linear, module)  # type: ignore[method-assign]
        self.origin, self.directions, self.points = origin, directions, points
        self.point_lists = [[float(c) for c in coeffs] for coeffs in points]  # as TorchScript takes them
        self.origin_flat = torch.cat([o.reshape(-1) for o in origin])  # in the flat buffer's order
        self.direction_flats = [torch.cat([t.reshape(-1) for t in d]) for d in directions]
        self.first: nn.Module | None = None
        self.probed = False
        # Scripted loops by first-layer output shape, or None: evaluate in Python. Only for models that
        # declare a forward without data-dependent Python control flow, which a trace would freeze.
        self.scripted: dict[tuple[int, ...], torch.jit.ScriptModule] | None = (
            {} if getattr(type(model), "trace_safe", False) and points else None)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, int, int]]:
        # The replica's weights are contiguous views of its flat buffer; NCHW inputs match them
        # (LeNet-5: 7.9 against 9.1 us per image and point for channels_last inputs).
        x = x.contiguous()
        if not self.probed:
            found = _input_layer(self.model, x)
            self.first, self.probed = (found if isinstance(found, nn.Module) else None), True
        if self.first is not None and self.scripted is not None:
            base, outputs = _first_layer_outputs(self.model, self.first, self.origin, self.directions, x)
            shape = tuple(base.shape)
            if shape not in self.scripted:
                try:
                    name = next(n for n, m in self.model.named_modules() if m is self.first)
                    self.scripted[shape] = _script_points(
                        self.source, name, self.origin_flat, self.direction_flats, base)
                except Exception as error:  # TorchScript cannot take this model (or is gone): evaluate in Python
                    self.scripted = None
                    warnings.warn(f"loss landscape: TorchScript could not take {type(self.source).__name__} "
                                  f"({type(error).__name__}: {error}); evaluating in Python (slower)", RuntimeWarning,
                                  stacklevel=2)
            if self.scripted is not None:
                losses, hits = self.scripted[shape](base, outputs, self.point_lists, y)
                return [(loss, hit, y.shape[0]) for loss, hit in zip(losses.tolist(), hits.tolist())]
        return _point_results(self.model, self.flat, self.first, self.origin, self.directions, self.origin_flat,
                              self.direction_flats, self.points, x, y)


def evaluate_along(
    model: nn.Module,
    directions: Sequence[Sequence[torch.Tensor]],
    points: Sequence[Sequence[float]],
    datasets: dict[str, Batches],
    progress: Callable[[], None] = lambda: None,
    workers: int | None = None,
) -> list[dict[str, float]]:
    """Loss and accuracy at theta* + sum_i c_i d_i for every coefficient tuple in ``points``.

    Data is the outer loop and points the inner one, so each batch is prepared once; and the first
    layer, which is linear in the coefficients (layer(x; W + c D) = layer(x; W) + c layer(x; D)), is
    computed once per direction and batch instead of once per point. On the CPU, ``workers`` threads
    (default: torch's thread count) each evaluate whole batches on their own copy of the model with
    one intra-op thread: a small model's layers do not split well over cores, whole batches do. For
    models that declare ``trace_safe = True`` (bigbatch's own) the points of a batch run as TorchScript,
    which does not hold Python's GIL. Sums are added in batch order, so the result does not depend on
    the number of workers. ``model`` is not modified. ``progress`` is called once per batch.
    """
    model.eval()
    origin = [p.detach().clone(memory_format=torch.contiguous_format) for p in model.parameters()]  # NCHW, as inputs
    on_cpu = all(p.device.type == "cpu" for p in origin)
    workers = max(1, workers or (torch.get_num_threads() if on_cpu else 1))
    jobs = ((name, x, y) for name, batches in datasets.items() for x, y in batches())
    lock = threading.Lock()
    done: list[tuple[int, str, list[tuple[float, int, int]]]] = []
    count = itertools.count()
    failed = threading.Event()  # one worker's error stops the others instead of letting them finish the data

    def work() -> None:
        replica = _Replica(model, origin, directions, points)
        try:
            while not failed.is_set():
                with lock:  # batches are made one at a time, in order
                    job, number = next(jobs, None), next(count)
                if job is None:
                    return
                name, x, y = job
                results = replica(x, y)
                with lock:
                    done.append((number, name, results))
                    progress()
        except BaseException:
            failed.set()
            raise

    threads_before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(work) for _ in range(workers)]:
                future.result()
    finally:
        torch.set_num_threads(threads_before)
    sums = {name: [[0.0, 0, 0] for _ in points] for name in datasets}
    for _, name, results in sorted(done, key=lambda item: item[0]):
        for acc, (loss_sum, hits, total) in zip(sums[name], results):
            acc[0] += loss_sum
            acc[1] += hits
            acc[2] += total
    rows = []
    for k, coeffs in enumerate(points):
        row: dict[str, float] = {f"c{i}": float(c) for i, c in enumerate(coeffs)}
        for name in datasets:
            loss_sum, hits, total = sums[name][k]
            row[f"{name}_loss"], row[f"{name}_acc"] = loss_sum / total, hits / total
        rows.append(row)
    return rows


def linspace(start: float, stop: float, num: int) -> list[float]:
    return [float(v) for v in torch.linspace(start, stop, num, dtype=torch.float64)]
