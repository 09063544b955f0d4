"""Atomic files and JSONL (io.py): a failed write leaves the old file, a bad row names its line."""

import pytest

from bigbatch.errors import BigbatchError
from bigbatch.io import atomic_file, atomic_write_text, read_jsonl, write_jsonl


def test_a_write_that_raises_midway_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "results.txt"
    atomic_write_text(path, "old\n")
    # A lone surrogate at its end cannot be encoded: write() raises before the new text is in.
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new\n" * 10_000 + "\ud800")
    assert path.read_text() == "old\n"
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_file(path, "w") as f:
            f.write("new\n" * 10_000)
            f.flush()  # the partial text is on disk, in the temporary file
            raise RuntimeError("stopped midway")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]  # no temporary file left


def test_read_jsonl_names_the_file_and_the_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []  # not written yet
    write_jsonl(path, [{"epoch": 1}, {"epoch": 2}])
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text(path.read_text() + "\n" + '{"epoch": 3\n')  # a blank line, then a torn row
    with pytest.raises(BigbatchError, match=r"metrics file '.*metrics\.jsonl' line 4 is not valid"):
        read_jsonl(path)


def test_metrics_never_hold_a_bare_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"epoch": 1, "test_loss": float("nan"), "lr": 0.1, "x": float("inf")}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_jsonl(path) == [
        {"epoch": 1, "test_loss": None, "lr": 0.1, "x": None, "nonfinite": ["test_loss", "x"]}
    ]
