"""On-paper projection of data-parallel K-FAC step time to 8, 64 and 512 workers, ResNet-50 sized,
in KAISA's three preconditioning modes (Pauloski et al., SC'21; ``kfac.grad_worker_fraction``).

Inputs measured here, in this run, on one thread of this machine:
  - the rate of a CIFAR ResNet-20 training step (multiply-adds per second of forward + backward),
  - the rate of the Gram products that build K-FAC factors (mm of a tall matrix with itself),
  - the time of a symmetric eigendecomposition (c * n^3, fitted on the sizes of --eigh-sizes).
Everything else is arithmetic on ResNet-50's layer shapes (ImageNet, 224x224) and a stated network
model: ring all-reduce, 2 (p-1)/p * bytes / bandwidth + 2 (p-1) * latency; a broadcast among q
ranks costs bytes / bandwidth + ceil(log2 q) * latency (pipelined), and broadcasts within disjoint
groups run at the same time.

The modes follow optim/kfac/distributed.py: the ranks split into groups of g consecutive ranks
(g = fraction * p); each layer's owner (assign_by_cost, by a^3 + g^3, over the groups first, then
a group's ranks) decomposes it. COMM-OPT (g = p) broadcasts every decomposition to all and every
rank preconditions every layer; HYBRID broadcasts a decomposition within its owner's group, whose
members precondition the group's layers and broadcast the results to the ranks at their own
position in the other groups (one broadcast among p/g ranks per group that owns a layer, every
step); MEM-OPT (g = 1) broadcasts no decomposition, and a rank preconditions its own layers and
broadcasts those results to all.
Memory per rank is the decompositions it holds (eigenvectors and eigenvalues of A and G, float32;
the factors themselves are on every rank in every mode).

    .venv/bin/python benchmarks/project_scaling.py [--bandwidth-gbs 12.5] [--latency-us 5]
        [--speedup 1 100] [--eigh-sizes 256 512 1024 1536]

Two regimes: weak scaling as large-batch practice does it (32 examples per worker, global batch
32 p), and strong scaling of one global batch of 4096 (4096 / p examples per worker). K-FAC at
bigbatch's defaults (statistics every 10 steps, eigendecompositions every 100). HYBRID uses groups
of 2^ceil(log2(p) / 2) ranks (about sqrt(p): 4, 8 and 32 at 8, 64 and 512 workers). ``--speedup``
divides every measured compute rate, to model a worker faster than one CPU thread (an accelerator)
on the same network.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import torch
from tqdm import tqdm

from bigbatch.models.resnet import CifarResNet
from bigbatch.optim.kfac.distributed import assign_by_cost
from common import bar, header, ratio, table

WEAK_LOCAL_BATCH, STRONG_GLOBAL_BATCH = 32, 4096
FACTOR_INTERVAL, INVERSE_INTERVAL = 10, 100
BYTES = 4  # float32
WORKERS = (1, 8, 64, 512)


def resnet50_layers() -> list[dict]:
    """Every conv/linear layer of ResNet-50 (v1.5: stride on the 3x3 conv) with its K-FAC shapes."""
    layers = []

    def conv(name, cin, cout, k, out_hw):
        layers.append(
            {
                "name": name,
                "a": cin * k * k,
                "g": cout,
                "locations": out_hw * out_hw,
                "macs": out_hw * out_hw * cout * cin * k * k,
            }
        )

    conv("conv1", 3, 64, 7, 112)
    cin, hw = 64, 56
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            out_hw = hw // stride
            p = f"layer{stage + 1}.{b}"
            conv(f"{p}.conv1", cin, width, 1, hw)
            conv(f"{p}.conv2", width, width, 3, out_hw)
            conv(f"{p}.conv3", width, 4 * width, 1, out_hw)
            if b == 0:
                conv(f"{p}.downsample", cin, 4 * width, 1, out_hw)
            cin, hw = 4 * width, out_hw
    layers.append({"name": "fc", "a": 2048 + 1, "g": 1000, "locations": 1, "macs": 2048 * 1000})
    return layers


def _median_time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_training_rate() -> float:
    """Multiply-adds per second of a ResNet-20 forward + backward (backward counted as 2x)."""
    model = CifarResNet(20).to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += (
                output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            )
        elif isinstance(module, torch.nn.Linear):
            macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    model(x)
    for h in hooks:
        h.remove()

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return 3 * macs / _median_time(step)


def measure_gram_rate() -> float:
    m = torch.randn(50_000, 576)
    return m.shape[0] * m.shape[1] ** 2 / _median_time(lambda: m.T @ m)


def measure_eigh_constant(sizes: list[int], progress: tqdm) -> float:
    """c in t = c n^3, fitted by least squares on several sizes."""
    times = []
    for n in sizes:
        q = torch.randn(n, 2 * n)
        s = q @ q.T / (2 * n) + 1e-2 * torch.eye(n)
        times.append(_median_time(partial(torch.linalg.eigh, s), repeats=1 if n > 1000 else 3))
        progress.update()
    cubes = [n**3 for n in sizes]
    return sum(t * c for t, c in zip(times, cubes)) / sum(c * c for c in cubes)


def triangle(n: int) -> int:
    return n * (n + 1) // 2


def ring_all_reduce(nbytes: float, p: int, bw: float, lat: float) -> float:
    return 0.0 if p == 1 else 2 * (p - 1) / p * nbytes / bw + 2 * (p - 1) * lat


def broadcast(nbytes: float, p: int, bw: float, lat: float) -> float:
    return 0.0 if p == 1 else nbytes / bw + math.ceil(math.log2(p)) * lat


def hybrid_group(p: int) -> int:
    """HYBRID's group size: about sqrt(p), a power of two that divides p."""
    return 2 ** math.ceil(math.log2(p) / 2)


def modes(p: int) -> list[tuple[str, int]]:
    """(mode, group size) at p workers; one worker has one mode."""
    if p == 1:
        return [("(one worker)", 1)]
    return [("COMM-OPT", p), (f"HYBRID, groups of {hybrid_group(p)}", hybrid_group(p))] + [
        ("MEM-OPT", 1)
    ]


def sharded_parts(
    layers: list[dict], owner: dict[str, int], p: int, group: int, bw: float, lat: float
) -> dict[str, float]:
    """Per step of one mode, before amortization and compute rates: the decomposition broadcast
    (s), the preconditioned-gradient broadcast (s), the busiest group's preconditioning (MAC)
    and the most decomposition bytes a rank holds."""
    by_group: dict[int, list[dict]] = {}
    for layer in layers:
        by_group.setdefault(owner[layer["name"]] // group, []).append(layer)
    # Eigenvectors and eigenvalues of A and G: what a layer's owner broadcasts to its group.
    decomposition = {
        g: sum((x["a"] ** 2 + x["a"] + x["g"] ** 2 + x["g"]) * BYTES for x in members)
        for g, members in by_group.items()
    }
    return {
        "decomposition broadcast": max(
            sum(
                broadcast((x["a"] ** 2 + x["a"] + x["g"] ** 2 + x["g"]) * BYTES, group, bw, lat)
                for x in members
            )
            for members in by_group.values()
        ),
        # Every group that owns a layer sends its results to the p / group ranks at each position.
        "gradient broadcast": 0.0
        if group == p
        else sum(
            broadcast(sum(x["a"] * x["g"] for x in members) * BYTES, p // group, bw, lat)
            for members in by_group.values()
        ),
        # Two changes of basis per layer, each two products.
        "preconditioning macs": max(
            sum(x["a"] * x["g"] * (x["a"] + x["g"]) * 2 for x in members)
            for members in by_group.values()
        ),
        "held bytes": max(decomposition.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=12.5,
        help="per-worker network bandwidth, GB/s (12.5 = 100 Gb/s)",
    )
    parser.add_argument(
        "--latency-us", type=float, default=5.0, help="per-message latency, microseconds"
    )
    parser.add_argument(
        "--speedup",
        type=float,
        nargs="+",
        default=[1.0, 100.0],
        help="worker compute speed as a multiple of one thread of this machine",
    )
    parser.add_argument(
        "--eigh-sizes", type=int, nargs="+", default=[256, 512, 1024, 1536], help="fit points"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    bw, lat = args.bandwidth_gbs * 1e9, args.latency_us * 1e-6

    progress = bar(2 + len(args.eigh_sizes), "measurements")
    train_rate = measure_training_rate()
    progress.update()
    gram_rate = measure_gram_rate()
    progress.update()
    eigh_c = measure_eigh_constant(args.eigh_sizes, progress)
    progress.close()
    layers = resnet50_layers()
    params = sum(layer["a"] * layer["g"] for layer in layers)
    fwd_macs = sum(layer["macs"] for layer in layers)
    full = sum(layer["a"] ** 2 + layer["g"] ** 2 for layer in layers) * BYTES
    upper = sum(triangle(layer["a"]) + triangle(layer["g"]) for layer in layers) * BYTES
    stats_macs_per_example = sum(
        layer["locations"] * (layer["a"] ** 2 + layer["g"] ** 2) for layer in layers
    )
    eig_cost = {layer["name"]: eigh_c * (layer["a"] ** 3 + layer["g"] ** 3) for layer in layers}
    biggest = max(layers, key=lambda layer: layer["a"])
    # The compute-free parts of each (workers, mode): the assignment does not depend on the regime.
    owners = {(p, g): assign_by_cost(eig_cost, p, g) for p in WORKERS for _, g in modes(p)}
    parts = {
        (p, group): sharded_parts(layers, owners[(p, group)], p, group, bw, lat)
        for p in WORKERS
        for _, group in modes(p)
    }

    print(header("Projected data-parallel K-FAC step time, ResNet-50 sized, three modes"))
    print(
        f"Measured on one thread here: training {train_rate / 1e9:.1f} GMAC/s (ResNet-20 step), "
        f"Gram {gram_rate / 1e9:.1f} GMAC/s, eigh {eigh_c * 1e9:.2f} s per 1000^3."
    )
    print(
        f"ResNet-50: {len(layers)} K-FAC layers, {params / 1e6:.1f} M weights, "
        f"{fwd_macs / 1e9:.2f} GMAC forward per image; factors {full / 1e6:.0f} MB "
        f"({upper / 1e6:.0f} MB upper triangles), decompositions "
        f"{parts[(1, 1)]['held bytes'] / 2**20:.0f} MiB; largest factor {biggest['a']} "
        f"({biggest['name']}), its eigendecomposition {eigh_c * biggest['a'] ** 3:.1f} s; all of "
        f"them {sum(eig_cost.values()):.1f} s on one thread."
    )
    print(
        f"Network model: {args.bandwidth_gbs:g} GB/s per worker, {args.latency_us:g} us per "
        f"message; statistics every {FACTOR_INTERVAL} steps, eigendecompositions (and their "
        f"broadcast) every {INVERSE_INTERVAL}. Seconds per step (amortized); ratios against SGD "
        "and against COMM-OPT at the same worker count.\n"
    )
    regimes = [
        (f"weak scaling, {WEAK_LOCAL_BATCH} examples per worker", lambda p: WEAK_LOCAL_BATCH),
        (f"strong scaling, global batch {STRONG_GLOBAL_BATCH}", lambda p: STRONG_GLOBAL_BATCH / p),
    ]
    columns = ["workers", "mode", "global batch", "forward+backward", "statistics"]
    columns += [
        "gradient all-reduce",
        "factor all-reduce (upper)",
        "eigendecompositions (max rank)",
    ]
    columns += ["decomposition broadcast", "preconditioning (max rank)"]
    columns += ["preconditioned-gradient broadcast", "K-FAC step", "SGD step", "K-FAC / SGD"]
    columns += ["vs COMM-OPT", "communication share", "decompositions MiB per rank"]
    for speed in args.speedup:
        for regime, local_batch in regimes:
            print(f"Worker = {speed:g}x one thread of this machine; {regime}\n")
            rows = []
            for p in WORKERS:
                b = local_batch(p)
                compute = 3 * fwd_macs * b / (train_rate * speed)
                stats = stats_macs_per_example * b / (gram_rate * speed) / FACTOR_INTERVAL
                grad = ring_all_reduce(params * BYTES, p, bw, lat)
                factor = ring_all_reduce(upper, p, bw, lat) / FACTOR_INTERVAL
                sgd = compute + grad
                comm_opt = None
                for mode, group in modes(p):
                    owner = owners[(p, group)]
                    busiest = max(
                        sum(eig_cost[n] for n, r in owner.items() if r == rank) for rank in range(p)
                    )
                    eig = busiest / speed / INVERSE_INTERVAL
                    part = parts[(p, group)]
                    bcast = part["decomposition broadcast"] / INVERSE_INTERVAL
                    precond = part["preconditioning macs"] / (gram_rate * speed)
                    solution = part["gradient broadcast"]
                    comm = grad + factor + bcast + solution
                    kfac = compute + stats + eig + precond + comm
                    comm_opt = comm_opt or kfac
                    rows.append(
                        [p, mode, round(b * p), f"{compute:.3f}", f"{stats:.3f}", f"{grad:.4f}"]
                        + [f"{factor:.4f}", f"{eig:.3f}", f"{bcast:.4f}", f"{precond:.4f}"]
                        + [f"{solution:.4f}", f"{kfac:.3f}", f"{sgd:.3f}", ratio(kfac, sgd)]
                        + [ratio(kfac, comm_opt), f"{100 * comm / kfac:.1f}%"]
                        + [f"{part['held bytes'] / 2**20:.0f}"]
                    )
            print(table(columns, rows))
            print()


if __name__ == "__main__":
    main()
