import csv
import json
import math
from pathlib import Path

import pytest

from bigbatch.config import Config
from bigbatch.errors import ConfigError
from bigbatch.experiments.grid import load_study, run_status, run_study
from bigbatch.io import read_jsonl, write_jsonl
from bigbatch.report.report import aggregate, degradation, load_run, summarize, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_paper_config_is_the_seed_table():
    study = load_study(ROOT / "configs" / "paper.toml")
    runs = {r.config.run.name: r.config for r in study.runs}
    assert len(runs) == 8
    expected_lr = {
        "sb-sgd": 1e-3,
        "lb-sgd": 5e-3,
        "sb-kfac": 2e-3,
        "lb-kfac": 4e-3,
        "sb-sgd-mixup": 5e-3,
        "lb-sgd-mixup": 1e-2,
        "sb-kfac-mixup": 5e-3,
        "lb-kfac-mixup": 8e-3,
    }
    for name, cfg in runs.items():
        assert cfg.optimizer.lr == expected_lr[name]
        assert cfg.run.epochs == 150
        assert cfg.schedule.decay_epochs == [71] and cfg.schedule.decay_factor == 0.5
        assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 1e-4
        assert cfg.train.batch_size == (128 if name.startswith("sb") else 2048)
        assert cfg.optimizer.name == ("kfac" if "kfac" in name else "sgd")
        assert cfg.model.name == "lenet5"
        if name.endswith("mixup"):
            assert cfg.augment.mixup_alpha == (0.9 if name.startswith("sb") else 0.7)
        else:
            assert cfg.augment.mixup_alpha == 0.0


def _write_study(tmp_path, body):
    path = tmp_path / "s.toml"
    path.write_text(f'[study]\nname = "s"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    return path


def test_grid_expansion_with_seeds_and_axes(tmp_path):
    path = _write_study(
        tmp_path,
        """seeds = [0, 1]
[base.run]
epochs = 2
[base.optimizer]
lr = 0.1
[[runs]]
name = "a"
train = { batch_size = 32 }
[[runs]]
name = "b"
optimizer = { name = "kfac" }
[grid]
"augment.label_smoothing" = [0.0, 0.1]
""",
    )
    study = load_study(path, ["run.epochs=3"])
    names = [r.config.run.name for r in study.runs]
    assert names == [
        "a-label_smoothing0.0-s0",
        "a-label_smoothing0.0-s1",
        "a-label_smoothing0.1-s0",
        "a-label_smoothing0.1-s1",
        "b-label_smoothing0.0-s0",
        "b-label_smoothing0.0-s1",
        "b-label_smoothing0.1-s0",
        "b-label_smoothing0.1-s1",
    ]
    first = study.runs[0].config
    assert first.train.batch_size == 32 and first.optimizer.lr == 0.1 and first.run.epochs == 3
    assert study.runs[1].config.run.seed == 1
    assert study.runs[2].config.augment.label_smoothing == 0.1
    assert (
        study.runs[4].config.optimizer.name == "kfac"
        and study.runs[4].config.train.batch_size == 128
    )
    assert study.runs[0].run_dir == tmp_path / "out" / "runs" / "a-label_smoothing0.0-s0"
    assert load_study(path, seeds=[7]).runs[0].config.run.seed == 7


def test_bad_study_values_name_the_run(tmp_path):
    path = _write_study(tmp_path, '[[runs]]\nname = "x"\noptimizer = { lr = -1.0 }\n')
    with pytest.raises(ConfigError, match="run 'x'.*optimizer.lr"):
        load_study(path)
    path = _write_study(tmp_path, '[[runs]]\nname = "x"\n[[runs]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="two runs named 'x'"):
        load_study(path)


def test_skip_finished_and_resume_interrupted(tmp_path):
    path = _write_study(
        tmp_path,
        """[base.run]
epochs = 2
[base.data]
format = "synthetic"
train_limit = 200
test_limit = 100
[base.train]
batch_size = 50
train_eval_examples = 100
[base.runtime]
progress = "off"
[[runs]]
name = "one"
[[runs]]
name = "two"
""",
    )
    study = load_study(path)
    assert [run_status(r) for r in study.runs] == ["new", "new"]
    # "two" is interrupted after epoch 1: train it with epochs=1 under the same directory.
    from bigbatch.train.trainer import Trainer

    one_epoch = load_study(path, ["run.epochs=1"]).runs[1]
    Trainer(one_epoch.config).fit()
    assert run_status(study.runs[1]) == "partial"
    run_study(study)
    assert [run_status(r) for r in study.runs] == ["done", "done"]
    stamp = (study.runs[0].run_dir / "checkpoint.pt").stat().st_mtime_ns
    run_study(study)  # both finished: nothing is retrained
    assert (study.runs[0].run_dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    rows = read_jsonl(study.runs[1].run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]


def _fake_run(
    root: Path,
    name: str,
    optimizer: str,
    batch: int,
    mixup: float,
    accs: list[float],
    seed: int = 0,
):
    cfg = Config()
    cfg.run.name, cfg.run.seed = name, seed
    cfg.optimizer.name, cfg.train.batch_size, cfg.augment.mixup_alpha = optimizer, batch, mixup
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    steps = 50000 // batch
    rows = [
        {
            "epoch": e + 1,
            "step": (e + 1) * steps,
            "train_time": 10.0 * (e + 1),
            "test_acc": a,
            "test_loss": 2 - a,
            "train_acc": a + 0.1,
            "train_eval_acc": a + 0.2,
            "train_loss": 1.5 - a,
        }
        for e, a in enumerate(accs)
    ]
    write_jsonl(run / "metrics.jsonl", rows)
    return run


def test_report_from_fake_runs(tmp_path):
    runs = [
        ("sb-sgd", "sgd", 128, 0.0, [0.3, 0.5, 0.60]),
        ("lb-sgd", "sgd", 2048, 0.0, [0.2, 0.4, 0.50]),
        ("sb-sgd-mixup", "sgd", 128, 0.9, [0.3, 0.5, 0.62]),
        ("lb-sgd-mixup", "sgd", 2048, 0.7, [0.2, 0.5, 0.58]),
        ("sb-kfac", "kfac", 128, 0.0, [0.4, 0.55, 0.58]),
        ("lb-kfac", "kfac", 2048, 0.0, [0.45, 0.52, 0.50]),
    ]
    results = [load_run(_fake_run(tmp_path / "runs", *r)) for r in runs]
    report = write_report(
        results, tmp_path / "report", title="T", target=0.5, command="bigbatch reproduce x"
    )
    text = report.read_text()
    assert "| sb-sgd | SGD | 128 | none |" in text
    deg = {
        (d["optimizer"], d["smoothed"]): d
        for d in degradation(aggregate([summarize(r, 0.5) for r in results]))
    }
    assert deg[("SGD", False)]["degradation"] == pytest.approx(0.10)
    assert deg[("SGD", True)]["degradation"] == pytest.approx(0.04)
    assert deg[("SGD", True)]["reduction_by_smoothing"] == pytest.approx(0.06)
    assert deg[("K-FAC", False)]["degradation"] == pytest.approx(0.08)
    assert (
        "| SGD | Mixup a=0.9 (SB) / Mixup a=0.7 (LB) | 128 | 2048 | 62.00 | 58.00 | 4.00 |" in text
    )
    summary = {r["run"]: r for r in csv.DictReader((tmp_path / "report" / "summary.csv").open())}
    assert float(summary["sb-sgd"]["generalization_gap"]) == pytest.approx(0.2)
    assert float(summary["lb-sgd"]["epochs_to_target"]) == 3
    assert float(summary["lb-kfac"]["updates_to_target"]) == 2 * (50000 // 2048)
    assert float(summary["sb-kfac"]["time_to_target_s"]) == 20.0
    assert "## Flatness" not in text
    (tmp_path / "runs" / "lb-kfac" / "sharpness.json").write_text(
        json.dumps({"top_eigenvalues": [12.5, 3.0], "trace": 80.0, "epsilon_sharpness": 4.25})
    )
    results[5] = load_run(tmp_path / "runs" / "lb-kfac")
    text = write_report(results, tmp_path / "report", title="T", target=0.5).read_text()
    assert "| lb-kfac | 12.5 | 80 | 4.25 |" in text
    # Without a study's figures: one comparison of all runs, no SB/LB labels.
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["test_vs_epoch_all.png", "test_vs_step_all.png", "test_vs_time_all.png"]
    # The paper study's figures come from its config, not from the report.
    paper = load_study(ROOT / "configs" / "paper.toml")
    assert paper.large_batch_from == 1024
    out = tmp_path / "paper-report"
    text = write_report(
        results,
        out,
        title="T",
        target=0.5,
        figures=paper.figures,
        large_batch_from=paper.large_batch_from,
    ).read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "test_vs_epoch_no-smoothing.png" in pngs and "test_vs_time_kfac.png" in pngs
    assert "test_vs_step_large-batch.png" in pngs and len(pngs) == 3 * 5
    for name in pngs:
        assert f"]({name})" in text


def test_report_seed_mean_and_spread(tmp_path):
    results = [
        load_run(_fake_run(tmp_path, f"a-s{s}", "sgd", 128, 0.0, [0.5, acc], seed=s), label="a")
        for s, acc in enumerate([0.60, 0.70])
    ]
    agg = aggregate([summarize(r, 0.9) for r in results])
    assert len(agg) == 1 and agg[0]["seeds"] == 2
    assert agg[0]["final_test_acc"] == pytest.approx(0.65)
    assert agg[0]["final_test_acc_std"] == pytest.approx(math.sqrt(0.005))
    assert math.isnan(agg[0]["epochs_to_target"])
    text = write_report(results, tmp_path / "r", title="T", target=0.9).read_text()
    assert "65.00 ± 7.07" in text


def test_every_shipped_study_config_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        if path.name == "demo.toml":
            continue  # a single-run train config
        study = load_study(path)
        assert study.runs, path
    smoothing = {
        r.config.run.name: r.config for r in load_study(ROOT / "configs" / "smoothing.toml").runs
    }
    assert len(smoothing) == 9 * 3
    scaled = smoothing["sgd-warmup-linear-scaling-s0"]
    assert scaled.schedule.linear_scaling and scaled.schedule.warmup_epochs == 5
    assert (
        smoothing["kfac-cutmix-s2"].augment.cutmix_alpha == 1.0
        and smoothing["kfac-cutmix-s2"].run.seed == 2
    )
