"""A small study on synthetic data, shared by the study tests."""

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def small_study(tmp_path: Path) -> Callable[..., Path]:
    """Writes ``s.toml``: runs of the given names, ``epochs`` each, under ``tmp_path/out``."""

    def write(epochs: int, names: tuple[str, ...] = ("one", "two")) -> Path:
        runs = "".join(f'[[runs]]\nname = "{name}"\n' for name in names)
        path = tmp_path / "s.toml"
        path.write_text(
            f"""[study]
name = "s"
output_dir = "{tmp_path / "out"}"
[base.run]
epochs = {epochs}
[base.data]
format = "synthetic"
train_limit = 200
test_limit = 100
[base.train]
batch_size = 50
train_eval_examples = 100
[base.runtime]
progress = "off"
{runs}"""
        )
        return path

    return write
