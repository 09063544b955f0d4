"""benchmarks/gpu_check.py in its CPU dry run: every check of the GPU script executes here, so the
script a GPU session runs cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_check(tmp_path):
    markdown = tmp_path / "gpu.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--markdown", str(markdown)],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only: the dry run takes minutes on a loaded 2-core CPU
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [
        line
        for line in done.stdout.splitlines()
        if line.split(" ")[0] in ("PASS", "FAIL", "SKIP", "DRY")
    ]
    names = [line.split(": ")[0].split(" ", 1)[1] for line in lines]
    assert "cuda tests" in names and "host syncs per step" in names and "bf16 K-FAC epoch" in names
    assert "compiled epoch" in names
    assert sum(n.startswith("epoch ") for n in names) == 4
    assert not any(line.startswith("FAIL") for line in lines), done.stdout
    assert "| Trainer / hand |" in markdown.read_text()
