"""Run directories as the trainer and the flatness analysis write them, with chosen numbers, for
the report tests.

Imported by the tests in this folder as ``from fake_runs import ...`` (pytest's prepend import
mode puts the folder on sys.path).
"""

import json
from pathlib import Path

from bigbatch.config import Config
from bigbatch.io import write_jsonl


def fake_run(
    root: Path,
    name: str,
    optimizer: str,
    batch: int,
    mixup: float,
    accs: list[float],
    seed: int = 0,
    loss_rise: float | None = None,
    hardware: list[str | None] | None = None,
) -> Path:
    """config.json, one metrics row per test accuracy in ``accs`` (50000 // batch steps an
    epoch), with ``hardware`` the machine of each epoch, and, with ``loss_rise``, a
    flatness_1d.json holding it."""
    cfg = Config()
    cfg.run.name, cfg.run.seed = name, seed
    cfg.optimizer.name, cfg.train.batch_size, cfg.augment.mixup_alpha = optimizer, batch, mixup
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    steps = 50000 // batch
    rows = [
        {
            "epoch": e + 1,
            "step": (e + 1) * steps,
            "train_time": 10.0 * (e + 1),
            "test_acc": a,
            "test_loss": 2 - a,
            "train_acc": a + 0.1,
            "train_eval_acc": a + 0.2,
            "train_loss": 1.5 - a,
        }
        for e, a in enumerate(accs)
    ]
    for row, machine in zip(rows, hardware or []):
        if machine is not None:  # None: an epoch of a run older than the field
            row["hardware"] = machine
    write_jsonl(run / "metrics.jsonl", rows)
    if loss_rise is not None:
        flatness = {"settings": {"distance": 0.1}, "train_loss_rise": loss_rise}
        (run / "flatness_1d.json").write_text(json.dumps(flatness))
    return run
