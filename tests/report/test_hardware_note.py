"""Reports say which machines their runs trained on, and warn when the times they compare come
from more than one (metrics rows record ``hardware`` per epoch: a run may resume elsewhere)."""

from fake_runs import fake_run

from bigbatch.report.report import aggregate, load_run, summarize, write_report
from bigbatch.report.results import hardware_of

GRID = [
    ("sb-sgd", "sgd", 128, 0.0, [0.3, 0.5, 0.60]),
    ("lb-sgd", "sgd", 2048, 0.0, [0.2, 0.4, 0.50]),
]


def _report(tmp_path, machines):
    runs = [load_run(fake_run(tmp_path / "runs", *r, hardware=m)) for r, m in zip(GRID, machines)]
    path = write_report(runs, tmp_path / "report", title="T", target=0.5, large_batch_from=1024)
    return path.read_text(), [summarize(r, 0.5) for r in runs]


def test_one_machine_is_named_and_not_warned_about(tmp_path):
    text, summaries = _report(tmp_path, [["CPU A"] * 3, ["CPU A"] * 3])
    assert "Hardware: all 2 runs trained on CPU A." in text
    assert "different machines" not in text
    assert "1x the small batch's wall time." in text  # no caveat on the ratio
    assert [s["hardware"] for s in summaries] == ["CPU A", "CPU A"]


def test_a_run_resumed_on_another_machine_is_flagged(tmp_path):
    text, summaries = _report(tmp_path, [["CPU A"] * 3, ["CPU A", "GPU B", "GPU B"]])
    assert summaries[1]["hardware"] == "CPU A + GPU B"
    # One label over both runs names each machine once.
    relabelled = [dict(s, label="one") for s in summaries]
    assert aggregate(relabelled)[0]["hardware"] == "CPU A + GPU B"
    assert "**the runs' times come from different machines**" in text
    assert "CPU A (1 run); CPU A + GPU B (1 run)" in text
    caveat = "(hardware of the small batch: CPU A; of the large: CPU A + GPU B; not one machine"
    assert caveat in text


def test_runs_older_than_the_field_are_not_recorded(tmp_path):
    text, _ = _report(tmp_path, [None, None])
    assert "Hardware: not recorded by these runs" in text
    # The time ratio is not known to be fair.
    assert "the small batch: not recorded; of the large: not recorded;" in text
    assert hardware_of([{"hardware": "X"}, {}]) == "X + not recorded"


def test_runs_recorded_only_in_part_are_not_one_known_machine(tmp_path):
    text, _ = _report(tmp_path, [[None, "CPU A", "CPU A"], [None, "CPU A", "CPU A"]])
    assert "different machines**: not recorded + CPU A (2 runs)" in text
    assert "of the large: not recorded + CPU A; not one machine" in text
