"""`bigbatch landscape` and `bigbatch sharpness` (analysis/commands.py) on two trained runs."""

import csv
import json

import pytest

from bigbatch.cli import main as cli_main
from bigbatch.io import read_jsonl


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
        base = run / "landscape" / "1d_filter_seed3_points5"
        rows = list(csv.DictReader(base.with_suffix(".csv").open()))
        assert [float(r["c0"]) for r in rows] == [-0.5, 0.0, 0.5, 1.0, 1.5]
        meta = json.loads(base.with_suffix(".json").read_text())
        assert meta["settings"]["seed"] == 3 and meta["settings"]["normalization"] == "filter"
        assert base.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        # a = 0 reproduces the run's own final evaluation.
        last = read_jsonl(run / "metrics.jsonl")[-1]
        assert float(rows[1]["test_loss"]) == pytest.approx(last["test_loss"], rel=1e-5)
        assert float(rows[1]["test_acc"]) == pytest.approx(last["test_acc"])
    assert list(a.parent.glob("landscape_1d_filter_seed3_points5_a_vs_b.png"))


def test_landscape_batch_size_changes_nothing_but_rounding(two_runs):
    a, _ = two_runs
    curves = []
    for batch in ("128", "7"):
        assert (
            cli_main(["landscape", str(a), "--points", "3", "--seed", "5", "--batch-size", batch])
            == 0
        )
        curves.append(list(csv.DictReader((a / "landscape" / "1d_none_seed5_points3.csv").open())))
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
    interpolation = a / "landscape" / "interpolation_to_b_range0to1_points3.json"
    rows = json.loads(interpolation.read_text())["points"]
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
    grid_file = a / "landscape" / "2d_none_seed0_points3_train50_test50.json"
    grid = json.loads(grid_file.read_text())["points"]
    assert len(grid) == 9 and {(r["c0"], r["c1"]) for r in grid} == {
        (x, y) for x in (-0.5, 0.5, 1.5) for y in (-0.5, 0.5, 1.5)
    }
    assert cli_main(["landscape", str(a), "--interpolate"]) == 2
    # Other settings are other results: the 2-D grid above and the interpolation are both kept.
    assert interpolation.exists()


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


@pytest.mark.cuda
def test_analysis_on_the_gpu_equals_the_cpu(two_runs):
    a, _ = two_runs
    options = ["--examples", "200", "--lanczos-steps", "8", "--trace-samples", "4"]
    results = []
    for device in ("cpu", "cuda"):
        assert cli_main(["sharpness", str(a), *options, "--device", device]) == 0
        results.append(json.loads((a / "sharpness.json").read_text()))
        assert cli_main(["landscape", str(a), "--points", "3", "--device", device]) == 0
        results.append(json.loads((a / "landscape" / "1d_none_seed0_points3.json").read_text()))
    cpu_sharpness, cpu_landscape, gpu_sharpness, gpu_landscape = results
    for key in ("top_eigenvalues", "trace", "epsilon_sharpness"):
        assert gpu_sharpness[key] == pytest.approx(cpu_sharpness[key], rel=1e-3), key
    for p, q in zip(gpu_landscape["points"], cpu_landscape["points"], strict=True):
        assert p["train_loss"] == pytest.approx(q["train_loss"], rel=1e-4)
