import os
import platform
import subprocess
import sys

CODE = "from bigbatch.allocator import keep_freed_memory as keep; print(keep(), keep())"


def _run(env):
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.split()


def test_allocator_setting_is_applied_once_and_can_be_switched_off():
    glibc = platform.libc_ver()[0] == "glibc"
    assert _run({}) == (["True", "True"] if glibc else ["False", "False"])
    assert _run({"BIGBATCH_KEEP_FREED_MEMORY": "0"}) == ["False", "False"]
