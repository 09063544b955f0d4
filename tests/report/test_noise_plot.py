"""The gradient noise scale's plots (report/plots.py) and its place in the study report."""

import json

import matplotlib.image

from bigbatch.config import Config
from bigbatch.io import write_jsonl
from bigbatch.report.plots import plot_noise_scale, plot_run_curves
from bigbatch.report.report import load_run, write_report


def _rows(noise):
    return [
        {
            "epoch": e + 1,
            "step": 10 * (e + 1),
            "train_time": 1.0 + e,
            "train_loss": 2.0 - 0.1 * e,
            "train_acc": 0.1 * e,
            "test_loss": 2.1 - 0.1 * e,
            "test_acc": 0.1 * e,
            "grad_noise_scale": b,
        }
        for e, b in enumerate(noise)
    ]


def test_noise_scale_plot_skips_unmeasured_epochs_and_runs(tmp_path):
    path = tmp_path / "noise.png"
    assert not plot_noise_scale({"off": _rows([None, None])}, path)
    assert not path.exists()
    assert plot_noise_scale({"off": _rows([None]), "on": _rows([None, 40.0, 90.0])}, path)
    assert matplotlib.image.imread(path).ndim == 3


def test_run_curves_gain_a_noise_scale_panel_when_measured(tmp_path):
    plot_run_curves(_rows([None, None]), tmp_path / "two.png")
    plot_run_curves(_rows([None, 40.0]), tmp_path / "three.png")
    two, three = (matplotlib.image.imread(tmp_path / n) for n in ("two.png", "three.png"))
    assert three.shape[1] > 1.3 * two.shape[1]


def test_study_report_shows_the_noise_scale(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(Config().to_dict()))
    write_jsonl(run / "metrics.jsonl", _rows([20.0, 50.0]))
    text = write_report([load_run(run)], tmp_path / "r", title="T", target=0.5).read_text()
    assert "![noise](noise_scale.png)" in text
    assert (tmp_path / "r" / "noise_scale.png").exists()
