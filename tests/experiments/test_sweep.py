"""Sweeps (experiments/sweep.py, tuning.py, sweep_results.py): expansion, the lr grid, the lr
choice, bad files, and the report from fake run directories; one real sweep end to end."""

import csv
import json
import math
from pathlib import Path

import pytest

from bigbatch.cli import main as cli_main
from bigbatch.errors import ConfigError
from bigbatch.experiments.grid import run_status
from bigbatch.experiments.sweep import Cell, load_sweep, run_sweep
from bigbatch.experiments.sweep_results import sweep_budget, write_report
from bigbatch.io import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]

SWEEP = """[sweep]
name = "s"
output_dir = "{out}"
target_accuracy = 0.6
batch_sizes = [512, 128, 2048]
max_epochs = {{ "128" = 10, "512" = 20, "2048" = 40 }}
base_batch_size = 128
lr_scaling = "{scaling}"
lr_factors = [0.5, 1, 2]
tuning_seeds = [0]
final_seeds = [0, 1, 2]
[base.optimizer]
momentum = 0.8
lr = 99.0
[optimizers.sgd]
optimizer = {{ name = "sgd", lr = 0.01 }}
[optimizers.kfac]
optimizer = {{ name = "kfac", lr = 0.002 }}
kfac = {{ damping = 0.03 }}
[smoothing.none]
[smoothing.mixup]
augment = {{ mixup_alpha = 0.5 }}
"""


def _sweep_file(tmp_path, scaling="sqrt", body=None):
    path = tmp_path / "sweep.toml"
    path.write_text((body or SWEEP).format(out=tmp_path / "out", scaling=scaling))
    return path


def test_expansion_names_budgets_and_lr_grid(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path), ["optimizer.weight_decay=0.0"])
    assert sweep.batch_sizes == [128, 512, 2048]
    assert len(sweep.cells()) == 2 * 2 * 3
    runs = {r.config.run.name: r.config for r in sweep.tuning_runs()}
    assert len(runs) == 12 * 3
    # sqrt scaling from 128: at 512 the centre is 0.01 * 2 = 0.02, the grid 0.01, 0.02, 0.04.
    assert [n for n in runs if n.startswith("sgd-b512-")] == [
        "sgd-b512-lr0.01-s0",
        "sgd-b512-lr0.02-s0",
        "sgd-b512-lr0.04-s0",
    ]
    cfg = runs["kfac-mixup-b2048-lr0.016-s0"]  # 0.002 * sqrt(16) * 2
    assert cfg.optimizer.name == "kfac" and cfg.optimizer.lr == pytest.approx(0.016)
    assert cfg.kfac.damping == 0.03 and cfg.augment.mixup_alpha == 0.5
    assert cfg.train.batch_size == 2048 and cfg.run.epochs == 40
    assert cfg.run.stop_at_test_acc == 0.6 and cfg.run.seed == 0
    assert cfg.optimizer.momentum == 0.8 and cfg.optimizer.weight_decay == 0.0  # base, --set
    assert runs["sgd-b128-lr0.005-s0"].augment.mixup_alpha == 0.0
    assert sweep.tuning_runs()[0].run_dir == tmp_path / "out" / "runs" / "sgd-b128-lr0.005-s0"

    linear = load_sweep(_sweep_file(tmp_path, "linear"))
    assert linear.scaled_lr(Cell("sgd", "none", 2048)) == pytest.approx(0.01 * 16)
    none = load_sweep(_sweep_file(tmp_path, "none"))
    assert none.scaled_lr(Cell("kfac", "none", 2048)) == pytest.approx(0.002)


def test_each_optimizer_may_have_its_own_lr_scaling(tmp_path):
    table = SWEEP.replace(
        'lr_scaling = "{scaling}"', 'lr_scaling = {{ sgd = "linear", kfac = "none" }}'
    )
    sweep = load_sweep(_sweep_file(tmp_path, body=table))
    assert sweep.scaled_lr(Cell("sgd", "none", 2048)) == pytest.approx(0.01 * 16)
    assert sweep.scaled_lr(Cell("kfac", "mixup", 2048)) == pytest.approx(0.002)
    assert "1 (linear) for sgd, 0 (none) for kfac" in sweep_budget(sweep, sweep.choices()).lr_rule
    for bad, message in [
        ('{{ sgd = "linear" }}', r"give a rule for each of \['kfac', 'sgd'\]"),
        ('{{ sgd = "linear", kfac = "cube" }}', "'cube' for 'kfac'; choose one of linear"),
    ]:
        body = SWEEP.replace('lr_scaling = "{scaling}"', f"lr_scaling = {bad}")
        with pytest.raises(ConfigError, match=message):
            load_sweep(_sweep_file(tmp_path, body=body))


def _fake(run, accs_steps, noise=None):
    """A run directory as the trainer writes it: config.json and one metrics row per epoch."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    rows = []
    for epoch, (acc, step) in enumerate(accs_steps, 1):
        row = {
            "epoch": epoch,
            "step": step,
            "test_acc": acc,
            "test_loss": 2 - acc,
            "train_acc": acc,
            "train_loss": 2 - acc,
            "train_time": 2.0 * epoch,
            "wall_time": 2.5 * epoch,
        }
        if noise is not None:
            row["grad_noise_scale"] = noise
        rows.append(row)
    write_jsonl(run.run_dir / "metrics.jsonl", rows)


def _one_cell_sweep(tmp_path, rerun="false"):
    body = f"""[sweep]
output_dir = "{tmp_path / "out"}"
target_accuracy = 0.6
batch_sizes = [128]
max_epochs = 5
lr_factors = [0.5, 1, 2, 4]
final_seeds = [0, 1]
rerun_unreached = {rerun}
[optimizers.sgd]
optimizer = {{ name = "sgd", lr = 0.1 }}
"""
    (tmp_path / "one.toml").write_text(body)
    return load_sweep(tmp_path / "one.toml")


def test_lr_choice_fewest_steps_then_accuracy_then_smaller_lr(tmp_path):
    sweep = _one_cell_sweep(tmp_path)
    runs = {r.factor: r for r in sweep.tuning_runs()}
    _fake(runs[0.5], [(0.3, 100), (0.5, 200), (0.55, 300)])  # never reaches 0.6
    _fake(runs[1.0], [(0.4, 100), (0.62, 200)])  # 200 steps, ends at 0.62
    _fake(runs[2.0], [(0.45, 100), (0.65, 200)])  # 200 steps, ends at 0.65: wins the tie
    _fake(runs[4.0], [(0.2, 100), (0.4, 200), (0.7, 300)])  # 300 steps
    (choice,) = sweep.choices()
    assert choice.factor == 2.0 and choice.lr == pytest.approx(0.2)
    assert choice.reached and not choice.at_edge
    _fake(runs[2.0], [(0.45, 100), (0.62, 200)])  # now an exact tie with factor 1
    (choice,) = sweep.choices()
    assert choice.factor == 1.0  # the smaller lr
    finals = sweep.final_runs([choice])
    assert [r.config.run.name for r in finals] == ["sgd-b128-lr0.1-s0", "sgd-b128-lr0.1-s1"]
    assert finals[0].run_dir == runs[1.0].run_dir  # the tuning run is reused, not rerun


def test_cell_that_never_reaches_the_target(tmp_path):
    sweep = _one_cell_sweep(tmp_path)
    for factor, run in {r.factor: r for r in sweep.tuning_runs()}.items():
        best = 0.5 if factor == 4.0 else 0.4
        _fake(run, [(0.3, 100), (best, 200), (best - 0.05, 300)])
    (choice,) = sweep.choices()
    assert choice.factor == 4.0 and not choice.reached and choice.at_edge
    assert "not reached" in choice.summary() and "edge" in choice.summary()
    assert sweep.final_runs([choice]) == []  # not rerun by default
    assert len(_one_cell_sweep(tmp_path, "true").final_runs([choice])) == 2
    report = write_report(sweep).read_text()
    assert "no lr reached the target" in report and "0/1" in report


def test_no_metrics_yet_means_no_choice(tmp_path):
    sweep = _one_cell_sweep(tmp_path)
    (choice,) = sweep.choices()
    assert not choice.has_data and sweep.final_runs([choice]) == []
    assert _one_cell_sweep(tmp_path, "true").final_runs([choice]) == []  # nothing to rerun yet
    with pytest.raises(Exception, match="no run of sweep"):
        write_report(sweep)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_from_fake_runs_recovers_the_critical_batch(tmp_path):
    """Every run's steps to target follow S(B) = 1000 (1 + 512 / B) exactly (seed 1 takes 10%
    more, seed 2 10% fewer): the fit must give S_min = 1000 and B_crit = 512 back."""
    sweep = load_sweep(_sweep_file(tmp_path))
    noise = {128: 300.0, 512: 500.0, 2048: 700.0}
    for run in sweep.tuning_runs():
        cell = run.cell
        exact = 1000.0 * (1 + 512 / cell.batch_size)
        # Only the centre of the grid reaches the target; the SGD runs log B_simple.
        accs = [(0.3, exact / 2), (0.65 if run.factor == 1.0 else 0.5, exact)]
        _fake(run, accs, noise=noise[cell.batch_size] if cell.optimizer == "sgd" else None)
    choices = sweep.choices()
    assert all(c.factor == 1.0 and c.reached for c in choices)
    for run in sweep.final_runs(choices):
        if run.seed == 0:
            continue
        exact = 1000.0 * (1 + 512 / run.cell.batch_size) * (1.1 if run.seed == 1 else 0.9)
        _fake(run, [(0.3, exact / 2), (0.6 + 0.01 * run.seed, exact)])
    report = write_report(sweep, "bigbatch sweep x")
    out = report.parent
    for name in ("steps.png", "time.png", "tuned_lr.png", "accuracy.png", "cells.csv"):
        assert (out / name).exists(), name
    assert not (out / "flatness.png").exists()  # no analysis was run
    groups = {g["group"]: g for g in _csv(out / "critical_batch.csv")}
    assert set(groups) == {"sgd", "sgd+mixup", "kfac", "kfac+mixup"}
    for g in groups.values():
        # Seeds 1 and 2 scatter symmetrically (x1.1, x0.9) around the exact curve.
        assert float(g["b_crit"]) == pytest.approx(512.0, rel=0.02)
        assert float(g["s_min"]) == pytest.approx(1000.0, rel=0.02)
        assert int(g["points"]) == 9 and g["fit_valid"] == "True"
        # sqrt-scaled centre chosen everywhere: the tuned lr's slope is 0.5.
        assert float(g["lr_slope"]) == pytest.approx(0.5)
    cells = {c["cell"]: c for c in _csv(out / "cells.csv")}
    b128 = cells["sgd-b128"]  # seeds 0, 1, 2: 5000, 5500 and 4500 steps
    assert float(b128["steps_to_target"]) == pytest.approx(5000.0)
    # 95% t-interval: t(2) = 4.303 times sd 500 over sqrt(3).
    assert float(b128["steps_to_target_ci95"]) == pytest.approx(4.303 * 500 / math.sqrt(3))
    assert int(b128["seeds"]) == 3 and int(b128["seeds_reaching_target"]) == 3
    assert float(b128["final_test_acc"]) == pytest.approx((0.65 + 0.61 + 0.62) / 3)
    # B_simple: only seed 0 of the SGD cells logged it.
    assert float(b128["grad_noise_scale"]) == pytest.approx(300.0)
    assert cells["kfac-b128"]["grad_noise_scale"] == "nan"
    text = report.read_text()
    assert "B_simple" in text and "36 tuning + 24 reruns planned" in text
    assert "factors 0.5, 1, 2 (3 values per cell)" in text


def test_report_omits_the_noise_scale_when_no_run_logs_it(tmp_path):
    sweep = _one_cell_sweep(tmp_path)
    for run in sweep.tuning_runs():
        _fake(run, [(0.3, 100), (0.7, 200)])
    text = write_report(sweep).read_text()
    assert "B_simple" not in text and "Flatness" not in text
    assert "Hardware: not recorded by these runs" in text  # the fake rows do not record it


def test_report_shows_the_chosen_runs_flatness(tmp_path):
    sweep = _one_cell_sweep(tmp_path)
    for run in sweep.tuning_runs():
        _fake(run, [(0.3, 100), (0.7 if run.factor == 2.0 else 0.5, 200)])
    (choice,) = sweep.choices()
    chosen = sweep.run(choice.cell, choice.factor, 0).run_dir
    (chosen / "checkpoint.pt").write_bytes(b"")  # chosen_run looks for a checkpoint only
    sharp = {"top_eigenvalues": [12.5], "trace": 345.0, "epsilon_sharpness": 6.75}
    (chosen / "sharpness.json").write_text(json.dumps(sharp))
    report = write_report(sweep)
    assert "| sgd-b128 | 12.5 | 345 | 6.75 |" in report.read_text()
    assert (report.parent / "flatness.png").exists()


BAD = {
    "unknown key": ("target_acuracy = 0.5\n", "did you mean 'target_accuracy'"),
    "no target": ("", "target_accuracy in .* is missing"),
    "target above 1": ("target_accuracy = 60\n", "target_accuracy"),
    "budget table misses a batch": (
        'target_accuracy = 0.6\nmax_epochs = { "128" = 3 }\n',
        r"max_epochs .*missing \[512\]",
    ),
    "bad scaling": ('target_accuracy = 0.6\nlr_scaling = "cubic"\n', "linear, sqrt, none"),
    "repeated factor": ("target_accuracy = 0.6\nlr_factors = [1, 1]\n", "lr_factors"),
    "negative batch": ("target_accuracy = 0.6\nbatch_sizes = [0, 128]\n", "batch_sizes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files_name_the_key(tmp_path, case):
    line, message = BAD[case]
    defaults = {"batch_sizes": "[128, 512]", "max_epochs": "3", "lr_factors": "[1, 2]"}
    keys = "".join(
        f"{k} = {v}\n" for k, v in defaults.items() if not line.startswith(k) and k not in line
    )
    body = f'[sweep]\n{keys}{line}[optimizers.sgd]\noptimizer = {{ name = "sgd", lr = 0.1 }}\n'
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_sweep(tmp_path / "bad.toml")


def test_bad_tables_and_run_values(tmp_path):
    head = "[sweep]\ntarget_accuracy = 0.6\nbatch_sizes = [128]\nmax_epochs = 2\nlr_factors = [1]\n"
    cases = {
        "": "no \\[optimizers.NAME\\]",
        '[optimizers.sgd]\noptimizer = { name = "sgd" }\n': "needs its learning rate",
        '[optimizers."a/b"]\noptimizer = { lr = 0.1 }\n': "labels become run names",
        '[optimizers.sgd]\noptimizer = { name = "sgdd", lr = 0.1 }\n': "run 'sgd-b128-lr0.1-s0'"
        ".*did you mean 'sgd'",
        "[studdy]\n": "unknown tables",
    }
    for body, message in cases.items():
        (tmp_path / "bad.toml").write_text(head + body)
        with pytest.raises(ConfigError, match=message):
            load_sweep(tmp_path / "bad.toml")


def test_shipped_sweep_config_loads():
    sweep = load_sweep(ROOT / "configs" / "sweep-lenet5.toml")
    assert sweep.target == 0.6 and sweep.batch_sizes[0] == 128 and sweep.batch_sizes[-1] == 8192
    assert len(sweep.final_seeds) == 3 and 4 <= len(sweep.lr_factors) <= 6


def _synthetic_base(train_limit):
    """The [base] and [optimizers] tables of a tiny sweep on synthetic data."""
    return f"""[base.data]
format = "synthetic"
train_limit = {train_limit}
test_limit = 64
[base.train]
train_eval_examples = 0
[base.runtime]
progress = "off"
[optimizers.sgd]
optimizer = {{ name = "sgd", lr = 0.02 }}
"""


@pytest.mark.slow
def test_sweep_end_to_end_on_synthetic_data(tmp_path, capsys):
    body = f"""[sweep]
output_dir = "{tmp_path / "out"}"
target_accuracy = 0.55
batch_sizes = [32, 64]
max_epochs = 3
lr_factors = [1, 4]
flatness = true
flatness_examples = 64
flatness_lanczos_steps = 2
flatness_trace_samples = 2
""" + _synthetic_base(192)
    (tmp_path / "e2e.toml").write_text(body)
    assert cli_main(["sweep", str(tmp_path / "e2e.toml")]) == 0
    sweep = load_sweep(tmp_path / "e2e.toml")
    for run in sweep.tuning_runs():
        rows = read_jsonl(run.run_dir / "metrics.jsonl")
        hits = [r["epoch"] for r in rows if r["test_acc"] >= 0.55]
        # Stopped at the first epoch reaching the target, or trained its whole budget.
        assert (hits and hits[0] == rows[-1]["epoch"]) or len(rows) == 3
        assert run_status(run) == "done"
    report = tmp_path / "out" / "report" / "report.md"
    assert "## Critical batch size" in report.read_text()
    for choice in sweep.choices():  # the flatness of each cell's chosen run, seed 0
        result = json.loads(
            (sweep.run(choice.cell, choice.factor, 0).run_dir / "sharpness.json").read_text()
        )
        assert result["settings"]["examples"] == 64 and result["settings"]["lanczos_steps"] == 2
        flat = sweep.run(choice.cell, choice.factor, 0).run_dir / "flatness_1d.json"
        assert json.loads(flat.read_text())["settings"]["train_examples"] == 64
    assert "## Flatness of each cell's solution" in report.read_text()
    assert "| 1-D loss rise |" in report.read_text()
    capsys.readouterr()
    assert cli_main(["sweep", str(tmp_path / "e2e.toml")]) == 0  # everything is skipped
    out = capsys.readouterr().out
    assert "queued" not in out and "flatness:" not in out


@pytest.mark.slow
def test_a_diverged_run_is_a_result_not_a_failure(tmp_path, capsys):
    body = f"""[sweep]
output_dir = "{tmp_path / "out"}"
target_accuracy = 0.99
batch_sizes = [64]
max_epochs = 2
lr_factors = [1, 100000]
""" + _synthetic_base(128)
    (tmp_path / "d.toml").write_text(body)
    sweep = load_sweep(tmp_path / "d.toml")
    (choice,) = run_sweep(sweep)
    wild = sweep.run(choice.cell, 100000.0, 0).run_dir
    assert "after epoch 1" in (wild / "diverged.txt").read_text()  # the trainer's message
    assert choice.factor == 1.0 and not choice.reached
    capsys.readouterr()
    run_sweep(sweep)  # the diverged run is not tried again
    assert "1 runs diverged earlier" in capsys.readouterr().out
    assert "1 runs diverged" in write_report(sweep).read_text()
