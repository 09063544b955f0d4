"""run.retain_memory: freed big blocks stay in the process instead of coming back as fresh pages."""

import subprocess
import sys

import pytest

# Builds a Trainer (which applies run.retain_memory), then counts the page faults of allocating and
# filling a 64 MB array - above glibc's largest adaptive mmap threshold - over and over. (numpy's plain
# malloc: torch's 64-byte-aligned blocks are not always handed back to the same request.)
CYCLE = """
import resource, sys, numpy as np
from bigbatch.config import load_config
from bigbatch.train.trainer import Trainer
cfg = load_config(None, ["data.format=synthetic", "data.train_limit=64", "data.test_limit=32", "train.batch_size=32",
                         "train.progress=off", f"run.output_dir={sys.argv[1]}", f"run.retain_memory={sys.argv[2]}",
                         "run.device=cpu"])
Trainer(cfg)
cycle = lambda: np.ones(16 << 20, dtype=np.float32)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_retained_memory_reuses_freed_big_blocks(tmp_path):
    faults = {
        flag: float(subprocess.run([sys.executable, "-c", CYCLE, str(tmp_path / flag), flag], check=True,
                                   capture_output=True, text=True).stdout)
        for flag in ("true", "false")
    }
    assert faults["true"] < 4  # the freed block was reused: no fresh pages
    assert faults["false"] > faults["true"]  # by default glibc unmaps it and the next one faults in again
