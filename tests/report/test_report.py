"""Reports (report/): numbers, markdown tables, summary CSV and figures from fake runs."""

import csv
import json
import math
from pathlib import Path

import pytest
from fake_runs import fake_run as _fake_run

from bigbatch.config import Config
from bigbatch.experiments.grid import load_study
from bigbatch.report.figures import legend_labels
from bigbatch.report.plots import plt
from bigbatch.report.report import aggregate, degradation, load_run, summarize, write_report

ROOT = Path(__file__).resolve().parents[2]


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
    assert "| sb-sgd | 1 | SGD | 128 | none |" in text
    deg = {
        (d["optimizer"], d["smoothed"]): d
        for d in degradation([summarize(r, 0.5) for r in results])
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
    assert "| lb-kfac | 12.5 | 80 | 4.25 | - |" in text
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
    assert "| a | 0 of 2 | - | - | - |" in text  # time to target: no seed reached it
    assert "None can be tested on these runs" in text  # one config: no claim to test


def test_degradation_spread_is_a_welch_interval(tmp_path):
    accs = {128: [0.60, 0.62], 2048: [0.50, 0.54]}
    results = [
        load_run(_fake_run(tmp_path, f"b{b}-s{s}", "sgd", b, 0.0, [a], seed=s), label=f"b{b}")
        for b, finals in accs.items()
        for s, a in enumerate(finals)
    ]
    summaries = [summarize(r, 0.5) for r in results]
    (row,) = degradation(summaries)
    # Variances 0.0002 and 0.0008 over 2 seeds each: var = 0.0005, Welch dof
    # 0.0005^2 / (0.0001^2 + 0.0004^2) = 1.47, rounded down to 1: t = 12.706.
    assert row["degradation"] == pytest.approx(0.09)
    assert row["degradation_ci95"] == pytest.approx(12.706 * math.sqrt(0.0005))
    text = write_report(results, tmp_path / "r", title="T", target=0.5).read_text()
    assert "| 61.00 ± 1.41 | 52.00 ± 2.83 | 9.00 ± 28.41 |" in text


def test_degradation_keeps_smoothing_kinds_apart(tmp_path):
    # Mixup and label smoothing at both batches: each kind its own row and its own reduction,
    # never a small batch of one kind against a large batch of the other.
    runs = [("b128", 0.0, 0.0, 0.60), ("b2048", 0.0, 0.0, 0.50)]
    runs += [("mix128", 0.9, 0.0, 0.62), ("mix2048", 0.7, 0.0, 0.58)]
    runs += [("ls128", 0.0, 0.1, 0.61), ("ls512", 0.0, 0.1, 0.59), ("ls2048", 0.0, 0.1, 0.52)]
    summaries = []
    for name, mixup, smoothing, acc in runs:
        run_dir = _fake_run(tmp_path, name, "sgd", int(name.strip("abcilmsx")), mixup, [acc])
        config = json.loads((run_dir / "config.json").read_text())
        config["augment"]["label_smoothing"] = smoothing
        (run_dir / "config.json").write_text(json.dumps(config))
        summaries.append(summarize(load_run(run_dir), 0.5))
    rows = {r["smoothing"]: r for r in degradation(summaries)}
    assert set(rows) == {"none", "Mixup a=0.9 (SB) / Mixup a=0.7 (LB)", "LS 0.1"}
    mixup, smoothing = rows["Mixup a=0.9 (SB) / Mixup a=0.7 (LB)"], rows["LS 0.1"]
    assert mixup["degradation"] == pytest.approx(0.04)
    assert mixup["reduction_by_smoothing"] == pytest.approx(0.06)
    assert smoothing["degradation"] == pytest.approx(0.09)
    assert (smoothing["small_batch"], smoothing["large_batch"]) == (128, 2048)
    assert smoothing["reduction_by_smoothing"] == pytest.approx(0.01)


def test_lars_and_sam_are_named_in_the_report():
    from bigbatch.report.results import RunResult

    cfg = Config()
    cfg.optimizer.name, cfg.optimizer.sam_rho = "lars", 0.05
    run = RunResult("a", "a", cfg.to_dict(), [], {})
    assert run.optimizer == "LARS" and run.smoothing == "SAM rho=0.05" and run.smoothed
    older = cfg.to_dict()
    del older["optimizer"]["sam_rho"]  # a run from before SAM existed
    assert RunResult("b", "b", older, [], {}).smoothing == "none"


def test_comparison_legend_has_one_entry_per_config(tmp_path):
    results = [
        load_run(_fake_run(tmp_path, f"a-s{s}", "sgd", 128, 0.0, [0.5], seed=s), label="a")
        for s in range(3)
    ] + [
        load_run(_fake_run(tmp_path, name, "sgd", 2048, 0.0, [0.4]), label=name)
        for name in ("b", "c")  # two configs that plot alike stay two entries, not "2 seeds"
    ]
    labels = legend_labels(results, large_batch_from=1024)
    fig, ax = plt.subplots()
    for label in labels:
        ax.plot([0, 1], [0, 1], label=label)
    shown = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert shown == ["SB SGD (128), 3 seeds", "LB SGD (2048)", "LB SGD (2048)"]
