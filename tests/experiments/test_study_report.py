"""A study's report (experiments/study_report.py) holds its finished runs only."""

import pytest

from bigbatch.errors import BigbatchError
from bigbatch.experiments.grid import load_study
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
