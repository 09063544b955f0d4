import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.analysis.landscape import evaluate_along, evaluate_loss, random_direction
from bigbatch.analysis.sharpness import epsilon_sharpness
from bigbatch.cli import main as cli_main
from bigbatch.io import read_jsonl
from bigbatch.models import CifarResNet, LeNet5


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 2, 8, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    return lambda: [(x[:16], y[:16]), (x[16:], y[16:])], x, y


def test_same_seed_same_direction_and_filter_norms():
    model = _conv_net()
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
    model = _conv_net().eval()
    batches, x, y = _data()
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
    "conv-bn": (_conv_net, (2, 8, 8), 3),
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
    model = _conv_net().eval()
    seen = []

    def batches():
        for i in range(50):
            seen.append(i)
            if i == 3:
                yield (
                    torch.randn(4, 3, 8, 8),
                    torch.zeros(4, dtype=torch.long),
                )  # wrong channel count
            else:
                yield torch.randn(4, 2, 8, 8), torch.zeros(4, dtype=torch.long)

    with pytest.raises(RuntimeError):
        evaluate_along(model, [random_direction(model, 0)], [(0.0,), (0.5,)], {"train": batches})
    assert seen == [0, 1, 2, 3]


def test_epsilon_sharpness_is_nonnegative_and_grows_with_epsilon():
    model = _conv_net().eval()
    batches, _, _ = _data()
    small = epsilon_sharpness(model, batches, epsilon=1e-4, steps=5)
    large = epsilon_sharpness(model, batches, epsilon=1e-2, steps=5)
    assert 0 <= small["epsilon_sharpness"] < large["epsilon_sharpness"]
    assert small["base_loss"] == pytest.approx(evaluate_loss(model, batches)[0])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "0.05"), ("b", "0.2")):
        assert (
            cli_main(
                [
                    "train",
                    "--set",
                    "data.format=synthetic",
                    "--set",
                    "data.train_limit=300",
                    "--set",
                    "data.test_limit=100",
                    "--set",
                    f"runtime.output_dir={out}",
                    "--set",
                    f"run.name={name}",
                    "--set",
                    "run.epochs=2",
                    "--set",
                    "train.batch_size=50",
                    "--set",
                    f"optimizer.lr={lr}",
                    "--set",
                    "runtime.progress=off",
                ]
            )
            == 0
        )
    return out / "a", out / "b"


def test_landscape_command_writes_csv_json_png(two_runs):
    a, b = two_runs
    assert (
        cli_main(
            [
                "landscape",
                str(a),
                str(b),
                "--points",
                "5",
                "--normalization",
                "filter",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    for run in (a, b):
        base = run / "landscape" / "1d_filter_seed3"
        rows = list(csv.DictReader(base.with_suffix(".csv").open()))
        assert [float(r["c0"]) for r in rows] == [-0.5, 0.0, 0.5, 1.0, 1.5]
        meta = json.loads(base.with_suffix(".json").read_text())
        assert meta["settings"]["seed"] == 3 and meta["settings"]["normalization"] == "filter"
        assert base.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        # a = 0 reproduces the run's own final evaluation.
        last = read_jsonl(run / "metrics.jsonl")[-1]
        assert float(rows[1]["test_loss"]) == pytest.approx(last["test_loss"], rel=1e-5)
        assert float(rows[1]["test_acc"]) == pytest.approx(last["test_acc"])
    assert list(a.parent.glob("landscape_1d_filter_seed3_a_vs_b.png"))


def test_landscape_batch_size_changes_nothing_but_rounding(two_runs):
    a, _ = two_runs
    curves = []
    for batch in ("128", "7"):
        assert (
            cli_main(["landscape", str(a), "--points", "3", "--seed", "5", "--batch-size", batch])
            == 0
        )
        curves.append(list(csv.DictReader((a / "landscape" / "1d_none_seed5.csv").open())))
    for r128, r7 in zip(*curves):
        assert float(r7["train_loss"]) == pytest.approx(float(r128["train_loss"]), rel=1e-5)
        assert r7["test_acc"] == r128["test_acc"]
    assert cli_main(["landscape", str(a), "--batch-size", "0"]) == 2


def test_interpolation_and_2d(two_runs):
    a, b = two_runs
    assert (
        cli_main(
            ["landscape", str(a), str(b), "--interpolate", "--points", "3", "--range", "0", "1"]
        )
        == 0
    )
    rows = json.loads((a / "landscape" / "interpolation_to_b.json").read_text())["points"]
    assert rows[0]["test_loss"] == pytest.approx(
        read_jsonl(a / "metrics.jsonl")[-1]["test_loss"], rel=1e-5
    )
    assert rows[-1]["test_loss"] == pytest.approx(
        read_jsonl(b / "metrics.jsonl")[-1]["test_loss"], rel=1e-5
    )
    assert (
        cli_main(
            [
                "landscape",
                str(a),
                "--two-d",
                "--points",
                "3",
                "--test-examples",
                "50",
                "--train-examples",
                "50",
            ]
        )
        == 0
    )
    grid = json.loads((a / "landscape" / "2d_none_seed0.json").read_text())["points"]
    assert len(grid) == 9 and {(r["c0"], r["c1"]) for r in grid} == {
        (x, y) for x in (-0.5, 0.5, 1.5) for y in (-0.5, 0.5, 1.5)
    }
    assert cli_main(["landscape", str(a), "--interpolate"]) == 2


def test_sharpness_command(two_runs, capsys):
    a, _ = two_runs
    assert (
        cli_main(
            [
                "sharpness",
                str(a),
                "--examples",
                "200",
                "--lanczos-steps",
                "8",
                "--trace-samples",
                "4",
                "--ascent-steps",
                "3",
            ]
        )
        == 0
    )
    result = json.loads((a / "sharpness.json").read_text())
    assert result["settings"]["examples"] == 200 and result["settings"]["seed"] == 0
    assert (
        len(result["top_eigenvalues"]) == 3
        and result["top_eigenvalues"][0] >= result["top_eigenvalues"][1]
    )
    assert (
        result["top_eigenvalues"][0] > 0
        and result["trace_stderr"] >= 0
        and result["epsilon_sharpness"] >= 0
    )
    assert "top Hessian eigenvalues" in capsys.readouterr().out
