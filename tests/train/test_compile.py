"""train.compile (train/trainer.py): the compiled model trains the steps without K-FAC statistics
in one graph, K-FAC's statistics steps run eagerly, and the result is the eager run's."""

import pytest
import torch
from torch._dynamo.utils import counters

from bigbatch.config import load_config
from bigbatch.errors import ConfigError
from bigbatch.train.trainer import Trainer


def _cfg(tmp_path, name, *sets):
    return load_config(
        None,
        [
            "data.format=synthetic",
            f"runtime.output_dir={tmp_path}",
            f"run.name={name}",
            "run.epochs=1",
            "train.batch_size=64",
            "train.drop_last=true",  # one batch shape: one graph
            "train.train_eval_examples=0",
            "runtime.progress=off",
            "optimizer.name=kfac",
            "kfac.factor_interval=3",
            "kfac.inverse_interval=3",
            "optimizer.lr=0.05",
            *sets,
        ],
    )


@pytest.mark.slow
def test_compiled_kfac_run_equals_the_eager_run_without_graph_breaks(tmp_path, synthetic):
    eager = Trainer(_cfg(tmp_path, "eager"), synthetic).fit()
    torch._dynamo.reset()
    counters.clear()
    compiled_cfg = _cfg(
        tmp_path, "compiled", "train.compile=true", "runtime.compile_backend=aot_eager"
    )
    trainer = Trainer(compiled_cfg, synthetic)
    compiled = trainer.fit()
    # 9 steps: 3 with statistics (eager, hooks on), 6 through the compiled graph.
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert trainer.kfac.layers["fc3"].A is not None  # the eager steps still collected statistics
    for key in ("train_loss", "test_loss", "test_acc"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-5)


def test_an_unknown_compile_backend_is_named(tmp_path, synthetic):
    cfg = _cfg(tmp_path, "bad", "train.compile=true", "runtime.compile_backend=fastest")
    with pytest.raises(ConfigError, match="compile_backend.*inductor"):
        Trainer(cfg, synthetic)
