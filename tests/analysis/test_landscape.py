"""Loss landscapes (analysis/landscape.py): directions, evaluation along them against a naive
oracle, the first-layer shortcut, failing batches.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from analysis_toys import conv_net, toy_data
from torch import nn

from bigbatch.analysis.landscape import evaluate_along, evaluate_loss, random_direction
from bigbatch.models import CifarResNet, LeNet5


def test_same_seed_same_direction_and_filter_norms():
    model = conv_net()
    a, b = random_direction(model, 7, "filter"), random_direction(model, 7, "filter")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = random_direction(model, 8, "filter")
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    for p, d in zip(model.parameters(), a):
        if p.dim() <= 1:  # biases and BatchNorm parameters: no perturbation (Li et al. 2018)
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
    plain = random_direction(model, 7, "none")
    assert all(torch.count_nonzero(d) == d.numel() for d in plain)
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, 0, "layer")


def test_landscape_at_zero_is_the_model_loss_and_params_are_restored():
    model = conv_net().eval()
    batches, x, y = toy_data()
    before = [p.detach().clone() for p in model.parameters()]
    direction = random_direction(model, 0, "none")
    rows = evaluate_along(model, [direction], [(-0.5,), (0.0,), (1.0,)], {"train": batches})
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    assert rows[1]["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["train_loss"] != pytest.approx(expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # a = 1 is the model at theta* + delta.
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.add_(d)
    assert rows[2]["train_loss"] == pytest.approx(evaluate_loss(model, batches)[0], rel=1e-6)


class _LinearAppliedTwice(nn.Module):
    """Its first layer takes the input, then its own output: no single output to stand in for."""

    def __init__(self):
        super().__init__()
        self.square, self.head = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.square(torch.relu(self.square(x))))


class _HeadRegisteredFirst(nn.Module):
    """The first Linear in modules() runs last; the conv that takes the input comes after it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4 * 3 * 3, 3)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.conv(x)), 1))


class _DoubledConv2d(nn.Conv2d):
    """A Conv2d subclass computing something other than F.conv2d with its weight."""

    def forward(self, x):
        return 2 * super().forward(x)


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


# (model, shape of one example, classes); the first four apply a Conv2d or Linear to the input.
MODELS = {
    "conv-bn": (conv_net, (2, 8, 8), 3),
    "lenet5": (lambda: LeNet5(3, (32, 32), 10), (3, 32, 32), 10),
    "resnet8": (lambda: CifarResNet(8, 3, 10), (3, 32, 32), 10),  # conv1 without bias
    "mlp": (_mlp, (12,), 3),
    "flatten-first": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)), (2, 8, 8), 3),
    "applied-twice": (_LinearAppliedTwice, (12,), 3),
    "head-registered-first": (_HeadRegisteredFirst, (2, 6, 6), 3),
    "conv-subclass": (
        lambda: nn.Sequential(_DoubledConv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
        (2, 8, 8),
        3,
    ),
    "reflect-padding": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 3),
        ),
        (2, 8, 8),
        3,
    ),
}


POINTS = {
    "1d": [(-0.5,), (0.0,), (0.25,), (1.0,)],
    "2d": [(a, b) for a in (-0.5, 0.25, 1.0) for b in (0.0, 0.5)],
}


def _naive_evaluation(model, directions, points, datasets):
    """The oracle: at each point, a copy of the model moved there, evaluated by evaluate_loss."""
    rows = []
    for coeffs in points:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, *ds in zip(moved.parameters(), *directions):
                for c, d in zip(coeffs, ds):
                    p.add_(d, alpha=c)
        row = {f"c{i}": float(c) for i, c in enumerate(coeffs)}
        for name, batches in datasets.items():
            row[f"{name}_loss"], row[f"{name}_acc"] = evaluate_loss(moved, batches)
        rows.append(row)
    return rows


@pytest.mark.parametrize("dims", list(POINTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_landscape_matches_a_naive_evaluation_point_by_point(name, dims):
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, *shape, generator=g), torch.randint(0, classes, (40,), generator=g)
    datasets = {
        "train": lambda: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)],  # 16, 16, 8
        "test": lambda: [(x[:20], y[:20])],
    }
    points = POINTS[dims]
    directions = [random_direction(model, 1, "filter"), random_direction(model, 2, "none")]
    directions = directions[: len(points[0])]
    before = [p.detach().clone() for p in model.parameters()]
    rows = evaluate_along(model, directions, points, datasets)
    expected = _naive_evaluation(model, directions, points, datasets)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert [row.keys() for row in rows] == [row.keys() for row in expected]
    for row, oracle in zip(rows, expected):
        for split in datasets:
            assert row[f"{split}_loss"] == pytest.approx(oracle[f"{split}_loss"], rel=1e-5)
            assert row[f"{split}_acc"] == pytest.approx(oracle[f"{split}_acc"])
    assert evaluate_along(model, directions, points, datasets) == rows  # deterministic


@pytest.mark.parametrize("name", ["conv-bn", "lenet5", "mlp"])
def test_the_first_layer_runs_once_per_batch_not_once_per_point(name, monkeypatch):
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    shapes = []  # the weight shape at every forward of a layer of the first layer's type
    real = type(first).forward

    def forward(self, x):
        shapes.append(self.weight.shape)
        return real(self, x)

    monkeypatch.setattr(type(first), "forward", forward)
    x, y = torch.randn(12, *shape), torch.randint(0, classes, (12,))
    points = [(a,) for a in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    batches = lambda: [(x[:6], y[:6]), (x[6:], y[6:])]  # noqa: E731
    rows = evaluate_along(model, [random_direction(model, 0)], points, {"train": batches})
    assert len(rows) == len(points)
    # The first layer runs once, when the model is probed on the first batch; later layers of its
    # type also run for both batches at every point.
    later = [m for m in model.modules() if type(m) is type(first)][1:]
    assert shapes.count(first.weight.shape) == 1
    assert len(shapes) == 1 + len(later) * (1 + 2 * len(points))


def test_a_failing_batch_raises_and_stops_reading_data():
    model = conv_net().eval()
    seen = []

    def batches():
        for i in range(50):
            seen.append(i)
            if i == 3:
                # Wrong channel count.
                yield (
                    torch.randn(4, 3, 8, 8),
                    torch.zeros(4, dtype=torch.long),
                )
            else:
                yield torch.randn(4, 2, 8, 8), torch.zeros(4, dtype=torch.long)

    with pytest.raises(RuntimeError):
        evaluate_along(model, [random_direction(model, 0)], [(0.0,), (0.5,)], {"train": batches})
    assert seen == [0, 1, 2, 3]
