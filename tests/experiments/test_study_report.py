"""A study's report (experiments/study_report.py) holds its finished runs only."""

import pytest

from bigbatch.errors import BigbatchError
from bigbatch.experiments.grid import load_study, run_status
from bigbatch.experiments.study_report import write_study_report
from bigbatch.train.trainer import Trainer


def test_the_report_leaves_out_unfinished_runs_and_names_them(small_study):
    path = small_study(epochs=2, names=("one", "two", "three"))
    study = load_study(path)
    with pytest.raises(BigbatchError, match="no run of study 's' has finished yet"):
        write_study_report(study, "bigbatch reproduce s.toml")
    Trainer(study.runs[0].config).fit()
    Trainer(load_study(path, ["run.epochs=1"]).runs[1].config).fit()  # "two" stops at epoch 1
    text = write_study_report(study, "bigbatch reproduce s.toml").read_text()
    assert "**2 of 3 runs have not finished" in text
    assert "two (epoch 1 of 2), three (not started)" in text
    run_rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert "one" in run_rows
    assert "two" not in run_rows and "three" not in run_rows


def test_the_report_names_the_command_that_makes_it_again(small_study, tmp_path):
    from bigbatch.cli import main

    path = small_study(epochs=1, names=("one",))
    out = tmp_path / "elsewhere"
    argv = ["reproduce", str(path), "--seeds", "3", "--output-dir", str(out)]
    assert main([*argv, "--set", "optimizer.lr=0.02"]) == 0
    made_by = f"bigbatch reproduce {path} --seeds 3 --output-dir {out} --set optimizer.lr=0.02"
    assert f"Made by `{made_by}`." in (out / "report" / "report.md").read_text()
    # The named command's study is the one that ran: its run is there and finished.
    again = load_study(path, ["optimizer.lr=0.02"], seeds=[3], output_dir=str(out)).runs
    assert [run_status(run) for run in again] == ["done"]
