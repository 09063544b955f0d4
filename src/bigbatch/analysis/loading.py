"""What every analysis needs from a run directory: the trained model and its data, never a
trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigbatch.config import Config, DataConfig, read_run_config
from bigbatch.data import ImageDataset, load_dataset
from bigbatch.data.batches import BatchLoader, channel_stats
from bigbatch.errors import BigbatchError
from bigbatch.models import build_model
from bigbatch.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from bigbatch.train.distributed import resolve_device

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class TrainedRun:
    run_dir: Path
    config: Config
    model: nn.Module
    dataset: ImageDataset
    mean: list[float]
    std: list[float]
    epoch: int
    device: torch.device = torch.device("cpu")

    def batches(
        self,
        split: str,
        examples: int = 0,
        batch_size: int = 1000,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> Batches:
        """A re-iterable over the first ``examples`` (0: all) clean, normalized examples of a
        split."""
        images = self.dataset.train_images if split == "train" else self.dataset.test_images
        labels = self.dataset.train_labels if split == "train" else self.dataset.test_labels
        if examples:
            images, labels = images[:examples], labels[:examples]
        loader = BatchLoader(
            images,
            labels,
            min(batch_size, len(labels)),
            mean=self.mean,
            std=self.std,
            shuffle=False,
        )

        def iterate() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in loader:
                x = x.to(self.device, dtype, non_blocking=True)
                yield x.contiguous(memory_format=memory_format), y.to(self.device)

        return iterate


_DATASETS: dict[tuple, ImageDataset] = {}


def data_key(data: DataConfig) -> tuple[str, str, int, int]:
    """What decides a run's dataset: runs with equal keys can share one loaded copy."""
    return (data.format, data.path, data.train_limit, data.test_limit)


def load_trained_run(
    run_dir: str | Path, dataset: ImageDataset | None = None, device: str = "cpu"
) -> TrainedRun:
    """The run's model (on ``device``, a runtime.device value) and its data."""
    target = resolve_device(device)
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    d = cfg.data
    key = data_key(d)
    if dataset is None:
        dataset = _DATASETS.get(key)
    if dataset is None:
        dataset = load_dataset(
            d.format,
            d.path,
            train_limit=d.train_limit or None,
            test_limit=d.test_limit or None,
            cache_dir=cfg.runtime.cache_dir or None,
        )
        _DATASETS[key] = dataset
    model = build_model(
        cfg.model.name,
        dataset.channels,
        dataset.image_size,
        dataset.num_classes,
        cfg.model.ghost_batch_size,
    )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(exc)
        raise BigbatchError(
            f"the weights in '{run_dir / CHECKPOINT_NAME}' do not fit the run's model "
            f"'{cfg.model.name}' on {dataset.name} ({detail}); "
            "config.json and checkpoint.pt come from different runs"
        ) from None
    # NHWC is the fast layout for CPU convolutions (see the trainer); the maths is unchanged.
    model = model.to(target, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    mean, std = channel_stats(dataset.train_images)
    return TrainedRun(run_dir, cfg, model, dataset, mean, std, state["epoch"], target)
