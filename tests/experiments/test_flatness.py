"""The flatness analysis of studies and sweeps (experiments/flatness.py): its settings in [study]
and [sweep], skip on resume, and a real study with seeds and flatness from one command."""

import json
import math

import pytest

from bigbatch.cli import main as cli_main
from bigbatch.errors import ConfigError
from bigbatch.experiments.flatness import FlatnessSettings, analyse_runs
from bigbatch.experiments.grid import load_study
from bigbatch.experiments.sweep import load_sweep

TINY_DATA = """[base.data]
format = "synthetic"
train_limit = 192
test_limit = 64
[base.train]
batch_size = 32
train_eval_examples = 0
[base.runtime]
progress = "off"
"""


def _study(tmp_path, meta, runs='[[runs]]\nname = "r"\n'):
    path = tmp_path / "s.toml"
    path.write_text(f'[study]\noutput_dir = "{tmp_path}"\n{meta}\n{TINY_DATA}{runs}')
    return path


def test_settings_defaults_and_bad_values_name_the_key(tmp_path):
    assert load_study(_study(tmp_path, "")).flatness is None
    assert load_study(_study(tmp_path, "flatness = true")).flatness == FlatnessSettings(
        examples=2000, lanczos_steps=10, trace_samples=10, distance=0.1
    )
    chosen = load_study(_study(tmp_path, "flatness = true\nflatness_distance = 0.25")).flatness
    assert chosen is not None and chosen.distance == 0.25
    bad = {
        "flatness = 1": r"\[study\] flatness .* must be true or false",
        "flatness = true\nflatness_distance = 0": "flatness_distance .* positive number",
        "flatness = true\nflatness_examples = 1.5": "flatness_examples .* integer >= 1",
        "flatnes = true": "unknown key",
    }
    for meta, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_study(_study(tmp_path, meta))
    # The sweep reads the same keys through the same code.
    sweep = tmp_path / "w.toml"
    sweep.write_text(
        "[sweep]\ntarget_accuracy = 0.6\nbatch_sizes = [32]\nmax_epochs = 1\nlr_factors = [1]\n"
        "flatness = true\nflatness_distance = -1\n"
        '[optimizers.sgd]\noptimizer = { name = "sgd", lr = 0.1 }\n'
    )
    with pytest.raises(ConfigError, match=r"\[sweep\] flatness_distance"):
        load_sweep(sweep)


def test_results_are_kept_on_resume_and_redone_when_stale(synthetic_run, capsys):
    # The run directory is tmp_path/runs/r: a study there with a run named r owns it.
    study = load_study(_study(synthetic_run.parents[1], ""))
    settings = FlatnessSettings(examples=64, lanczos_steps=2, trace_samples=2, distance=0.1)
    sharp, flat = synthetic_run / "sharpness.json", synthetic_run / "flatness_1d.json"
    analyse_runs(study.runs, settings)
    out = capsys.readouterr().out
    assert "flatness: r sharpness" in out and "flatness: r 1-D loss rise" in out
    stamps = sharp.stat().st_mtime_ns, flat.stat().st_mtime_ns
    assert json.loads(flat.read_text())["requested"] == {"examples": 64, "distance": 0.1}

    analyse_runs(study.runs, settings)  # both current: nothing is redone
    assert capsys.readouterr().out == ""
    assert (sharp.stat().st_mtime_ns, flat.stat().st_mtime_ns) == stamps

    # Another distance redoes the landscape only; an analysis of an older epoch is redone.
    analyse_runs(study.runs, FlatnessSettings(64, 2, 2, distance=0.2))
    out = capsys.readouterr().out
    assert "1-D loss rise" in out and "sharpness" not in out
    assert json.loads(flat.read_text())["settings"]["distance"] == 0.2
    stale = json.loads(sharp.read_text())
    stale["settings"]["checkpoint_epoch"] = 0
    sharp.write_text(json.dumps(stale))
    analyse_runs(study.runs, FlatnessSettings(64, 2, 2, distance=0.2))
    assert "flatness: r sharpness" in capsys.readouterr().out


@pytest.mark.slow
def test_one_command_trains_seeds_analyses_and_reports_the_claims(tmp_path, capsys):
    runs = """[base.run]
epochs = 2
[base.optimizer]
lr = 0.02
[[runs]]
name = "plain"
[[runs]]
name = "mixup"
augment = { mixup_alpha = 0.5 }
"""
    meta = """target_accuracy = 0.3
flatness = true
flatness_examples = 64
flatness_lanczos_steps = 2
flatness_trace_samples = 2"""
    path = _study(tmp_path, meta, runs)
    assert cli_main(["reproduce", str(path), "--seeds", "0", "1"]) == 0
    study = load_study(path, seeds=[0, 1])
    assert sorted(r.config.run.name for r in study.runs) == [
        "mixup-s0",
        "mixup-s1",
        "plain-s0",
        "plain-s1",
    ]
    for run in study.runs:  # every run and seed analysed, with the study's settings
        flat = json.loads((run.run_dir / "flatness_1d.json").read_text())
        assert math.isfinite(flat["train_loss_rise"]) and flat["settings"]["train_examples"] == 64
        sharp = json.loads((run.run_dir / "sharpness.json").read_text())
        assert sharp["settings"]["lanczos_steps"] == 2 and math.isfinite(sharp["trace"])
    text = (tmp_path / "report" / "report.md").read_text()
    claim = text[text.index("### 4. Mixup flattens") :].split("###")[1]
    assert "| SGD, batch 32 |" in claim and "(n=2)" in claim
    assert any(v in claim for v in ("| held |", "| not held |", "| undecided |"))
    assert "| plain | 2 | SGD | 32 | none |" in text
    capsys.readouterr()
    assert cli_main(["reproduce", str(path), "--seeds", "0", "1"]) == 0  # resumed: all done
    out = capsys.readouterr().out
    assert "flatness:" not in out and out.count("finished earlier, skipped") == 4


def test_each_run_is_analysed_as_it_finishes_and_stands_without_its_checkpoint(tmp_path, capsys):
    from bigbatch.experiments.grid import train_runs

    meta = """flatness = true
flatness_examples = 32
flatness_lanczos_steps = 2
flatness_trace_samples = 1"""
    path = _study(tmp_path, meta, '[base.run]\nepochs = 1\n[[runs]]\nname = "a"\n')
    study = load_study(path)
    train_runs(study.runs, flatness=study.flatness)  # no end-of-study pass
    run_dir = study.runs[0].run_dir
    assert (run_dir / "sharpness.json").exists() and (run_dir / "flatness_1d.json").exists()
    # Committed results hold no checkpoint: the run is still finished, analysed and reported.
    (run_dir / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert cli_main(["reproduce", str(path)]) == 0
    out = capsys.readouterr().out
    assert "finished earlier, skipped" in out and "flatness:" not in out
    assert "| a | 1 | SGD | 32 | none |" in (tmp_path / "report" / "report.md").read_text()
    # Its analysis cannot be redone without the checkpoint: the study says so and goes on.
    (run_dir / "sharpness.json").unlink()
    assert cli_main(["reproduce", str(path)]) == 0
    assert "flatness: a has no checkpoint to analyse" in capsys.readouterr().out


def test_an_analysis_that_fails_does_not_fail_the_run(tmp_path, capsys, monkeypatch):
    import bigbatch.experiments.grid as grid

    def broken(runs, settings):
        raise RuntimeError("out of memory")  # as a Hessian product on a full GPU would

    monkeypatch.setattr(grid, "analyse_runs", broken)
    path = _study(tmp_path, "flatness = true", '[base.run]\nepochs = 1\n[[runs]]\nname = "a"\n')
    study = load_study(path)
    assert grid.train_runs(study.runs, flatness=study.flatness) == {}
    out = capsys.readouterr().out
    assert "flatness: a failed: out of memory" in out and "1/1 runs ended" in out
    assert grid.run_status(study.runs[0]) == "done"
