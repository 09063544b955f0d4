"""The epoch loop: train, evaluate, record metrics, checkpoint; resumable and reproducible.

The loop knows nothing of how K-FAC computes its factors: it calls ``accumulate_mc_fisher`` after
each forward when the MC Fisher is on, and ``step`` between backward and the SGD step.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from tqdm import tqdm

from bigbatch.augment.mixup import BatchMixer
from bigbatch.config import Config, config_from_dict, validate_against_data
from bigbatch.data import ImageDataset
from bigbatch.errors import BigbatchError, DivergedError, TrainingError
from bigbatch.io import atomic_torch_save, atomic_write_json, write_jsonl
from bigbatch.models import build_model
from bigbatch.optim.kfac.adaptive import AdaptiveDamping
from bigbatch.optim.optimizers import build_optimizer, group_lr
from bigbatch.optim.schedules import LRSchedule
from bigbatch.train.checkpoint import (
    CHECKPOINT_NAME,
    TRAINING_STATE,
    parse_checkpoint,
    read_checkpoint,
)
from bigbatch.train.distributed import ParallelContext, resolve_device
from bigbatch.train.hardware import hardware_name
from bigbatch.train.health import epoch_summary, progress_enabled, unhealthy
from bigbatch.train.noise_scale import NoiseScaleProbe, split_keeps_the_maths
from bigbatch.train.rundir import RunDirectory
from bigbatch.train.sam import SAM
from bigbatch.train.state import (
    check_compatible,
    experiment_fingerprint,
    load_config_dataset,
    peak_rss_mib,
    rng_state,
    seed_everything,
    set_determinism,
    set_rng_state,
)
from bigbatch.train.steps import (
    adapt_kfac_damping,
    compile_model,
    evaluate,
    forward_backward,
    make_loaders,
    micro_batch_size,
    on_device_if_it_fits,
    use_channels_last,
)
from bigbatch.train.stopping import reached_target


class Trainer:
    """One run: ``Trainer(cfg).fit(resume=...)`` returns the metrics rows (one per epoch)."""

    def __init__(
        self,
        cfg: Config,
        dataset: ImageDataset | None = None,
        parallel: ParallelContext | None = None,
    ):
        self.cfg = cfg
        self.parallel = parallel or ParallelContext(resolve_device(cfg.runtime.device))
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = self.parallel.device
        # Where the data lies may differ between machines; everything else must agree.
        self.parallel.check_same(experiment_fingerprint(cfg), "configs")
        self.dataset = dataset if dataset is not None else load_config_dataset(cfg)
        ds = self.dataset
        validate_against_data(
            cfg, ds.num_train, ds.num_test, self.parallel.world_size, ds.image_size
        )
        self.run_dir = cfg.run_dir()

        set_determinism(cfg.runtime.deterministic, self.device)
        seed_everything(cfg.run.seed)
        self.model = build_model(
            cfg.model.name, ds.channels, ds.image_size, ds.num_classes, cfg.model.ghost_batch_size
        ).to(self.device)
        self.memory_format = (
            torch.channels_last
            if use_channels_last(cfg, self.device, self.model)
            else torch.contiguous_format
        )
        self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.parallel.broadcast_parameters(self.model)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.sam = SAM(self.model, cfg.optimizer.sam_rho) if cfg.optimizer.sam_rho > 0 else None
        # fp16 needs loss scaling; disabled, the scaler's calls are the plain ones.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.kfac = self._build_kfac() if cfg.optimizer.name == "kfac" else None
        # Only the MC Fisher needs the logits of every forward (for its sampled-label backward).
        self.mc_fisher = (
            self.kfac if self.kfac is not None and cfg.kfac.fisher_type == "mc" else None
        )
        self.compiled: Any = None
        if cfg.train.compile:
            self.compiled = compile_model(self.model, cfg.runtime.compile_backend)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optimizer.lr, cfg.train.batch_size)
        self.train_loader, self.test_loader, self.train_eval_loader = make_loaders(
            cfg, on_device_if_it_fits(ds, self.device), self.parallel.rank, self.parallel.world_size
        )
        self.mixer = BatchMixer(
            cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha, seed=cfg.run.seed
        )
        local_batch = math.ceil(cfg.train.batch_size / self.parallel.world_size)
        self.micro_batch = micro_batch_size(cfg, self.model, self.device, local_batch)
        split_every = cfg.train.noise_scale_split_every if cfg.train.noise_scale else None
        can_split = split_keeps_the_maths(cfg, self.model)
        self.noise = NoiseScaleProbe(
            split_every, self.model, self.parallel.world_size, can_split, self.device
        )

    def _evaluate(self, loader: Any) -> dict[str, float]:
        model, precision = self.model, self.cfg.train.precision
        return evaluate(model, loader, self.device, self.memory_format, self.parallel, precision)

    def _training_model(self) -> Any:
        """The compiled model, except on K-FAC's statistics steps, whose hooks are Python."""
        if self.compiled is None or (self.kfac is not None and self.kfac.collecting):
            return self.model
        return self.compiled

    def _build_kfac(self) -> Any:
        from bigbatch.optim.kfac import KFACPreconditioner
        from bigbatch.optim.kfac.distributed import DistributedKFACPreconditioner

        extra: dict[str, Any] = {}
        kind: Any = KFACPreconditioner
        if self.parallel.world_size > 1:
            extra = {"timeout_s": getattr(self.parallel, "timeout_s", None)}
            kind = DistributedKFACPreconditioner
        return kind(self.model, self.cfg.kfac, seed=self.cfg.run.seed, **extra)

    # -- state ---------------------------------------------------------------------------------
    def _state(
        self,
        epoch: int,
        step: int,
        train_time: float,
        wall_time: float,
        rows: list[dict[str, Any]],
        kfac: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "metrics": rows,
            "step": step,
            "train_time": train_time,
            "wall_time": wall_time,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kfac": kfac,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def _restore(
        self, data: bytes, allow_change: tuple[str, ...]
    ) -> tuple[int, int, float, float, list[dict[str, Any]], dict[str, Any]]:
        path = self.run_dir / CHECKPOINT_NAME
        state = parse_checkpoint(data, path, require=TRAINING_STATE)
        if state["epoch"] > self.cfg.run.epochs:
            raise TrainingError(
                f"'{self.run_dir}' has trained {state['epoch']} epochs, more than run.epochs="
                f"{self.cfg.run.epochs}; resume with run.epochs >= {state['epoch']} (a finished "
                "run is not shortened), or start a new run.name"
            )
        changes = check_compatible(
            config_from_dict(state["config"], stored=True).experiment(),
            self.cfg.experiment(),
            path,
            allow_change,
        )
        try:
            self.model.load_state_dict(state["model"])
            # The config's hyperparameters, not the checkpoint's: an allowed change takes effect.
            hyper = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, values in zip(self.optimizer.param_groups, hyper, strict=True):
                group.update(values)
            if self.kfac is not None:
                self.kfac.load_state_dict(state["kfac"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
            raise TrainingError(
                f"checkpoint '{path}' does not fit this run's {self.cfg.model.name} ({detail}); "
                "it was written by another run or edited. Use the run's own checkpoint, or start "
                "over with --overwrite"
            ) from None
        set_rng_state(state["rng"])
        # The checkpoint carries the metrics up to its epoch: rows logged after it are re-run.
        return (
            state["epoch"],
            state["step"],
            state["train_time"],
            state["wall_time"],
            list(state["metrics"]),
            changes,
        )

    # -- loop ----------------------------------------------------------------------------------
    def fit(
        self, resume: bool = False, overwrite: bool = False, allow_change: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """Train (or with ``resume`` continue) the run; ``overwrite`` replaces an existing run once
        the new one has its first checkpoint; ``allow_change`` names experiment keys a resume may
        change (recorded in the first resumed row)."""
        checkpoint = self.run_dir / CHECKPOINT_NAME
        files, failure, data = None, None, None
        if self.parallel.is_main:
            # Only the main rank writes, so only it locks (before looking at what the dir holds)
            # and reads the checkpoint: the other ranks get its bytes and need no shared disk.
            try:
                exists = checkpoint.exists()
                files = RunDirectory(self.run_dir, replace=overwrite and not resume and exists)
                if not resume and exists and not overwrite:
                    raise TrainingError(
                        f"'{self.run_dir}' already holds a run; pass --resume to continue it, "
                        "--overwrite to start it again from scratch, or choose another run.name"
                    )
                data = read_checkpoint(checkpoint) if resume and exists else None
            except BigbatchError as exc:
                failure = exc
        try:
            self.parallel.agree(str(failure) if failure is not None else None)
            if failure is not None:
                raise failure
            if resume:
                data = self.parallel.share(data)
            return self._fit(files, data, allow_change)
        finally:
            if files is not None:
                files.close()

    def _fit(
        self, files: RunDirectory | None, checkpoint: bytes | None, allow_change: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        cfg, main = self.cfg, self.parallel.is_main
        rows: list[dict[str, Any]] = []
        start_epoch, step, train_time, wall_time = 0, 0, 0.0, 0.0
        changes: dict[str, Any] = {}
        if checkpoint is not None:
            start_epoch, step, train_time, wall_time, rows, changes = self._restore(
                checkpoint, allow_change
            )
        elif allow_change:
            raise TrainingError("--allow-change only applies with --resume")
        if files is not None:
            atomic_write_json(files.path / "config.json", cfg.to_dict())
            write_jsonl(files.path / "metrics.jsonl", rows)
        show = progress_enabled(cfg.runtime.progress, main)

        target = cfg.run.stop_at_test_acc
        for epoch in range(start_epoch, cfg.run.epochs):
            if reached_target(rows, target):
                break  # stopped early at its target (this run, or the one resumed)
            wall_start = time.perf_counter()
            comm_start, bytes_start = (
                self.parallel.communication_time,
                self.parallel.bytes_communicated,
            )
            if self.kfac is not None:
                self.kfac.reset_metrics()
            row = self.train_epoch(epoch, step, show)
            step = row["step"]
            train_time += row["epoch_time"]
            row["train_time"] = train_time
            self.parallel.average_buffers(self.model)  # before evaluating and checkpointing
            test = self._evaluate(self.test_loader)
            row.update(test_loss=test["loss"], test_acc=test["acc"])
            if self.train_eval_loader is not None:
                clean = self._evaluate(self.train_eval_loader)
                row.update(train_eval_loss=clean["loss"], train_eval_acc=clean["acc"])
            if self.parallel.world_size > 1:
                row["world_size"] = self.parallel.world_size
                row["communication_time"] = self.parallel.communication_time - comm_start
                row["bytes_communicated"] = self.parallel.bytes_communicated - bytes_start
            if self.kfac is not None:
                row.update(self.kfac.metrics())
            wall_time += time.perf_counter() - wall_start
            row["wall_time"] = wall_time
            row["max_rss_mib"] = peak_rss_mib()
            row["hardware"] = hardware_name(self.device, self.parallel.world_size)
            if self.device.type == "cuda":
                row["max_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            if changes:
                row["config_changes"], changes = changes, {}
            rows.append(row)
            # Before the checkpoint: a diverged epoch is never saved as the last good one.
            problem = unhealthy(rows, cfg.runtime, self.dataset.num_classes, files, self.run_dir)
            if problem:
                raise DivergedError(problem)
            last = epoch + 1 == cfg.run.epochs or reached_target(rows, target)
            due = (epoch + 1) % cfg.runtime.checkpoint_every == 0 or last
            # On every rank: sharded K-FAC gathers its decompositions for the main rank.
            kfac = self.kfac.checkpoint_state() if self.kfac is not None and due else None
            if files is not None:
                if due:
                    # Checkpoint before metrics: a crash in between re-runs this epoch on resume.
                    atomic_torch_save(
                        files.path / CHECKPOINT_NAME,
                        self._state(epoch + 1, step, train_time, wall_time, rows, kfac),
                    )
                    files.commit()
                write_jsonl(files.path / "metrics.jsonl", rows)
                if show:
                    tqdm.write(epoch_summary(row))
        return rows

    def train_epoch(self, epoch: int, step: int = 0, show: bool = False) -> dict[str, Any]:
        """One pass over the training set (no evaluation); returns its metrics and the new step
        count."""
        cfg = self.cfg
        self.train_loader.set_epoch(epoch)
        self.mixer.set_epoch(epoch)
        self.model.train()
        steps_per_epoch = len(self.train_loader)
        # Sums stay on the device and are read once, at the end: no host sync per step for them.
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, hits, examples
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.run.epochs}",
            disable=not show,
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            lr = self.schedule.lr_at(epoch, i / steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = group_lr(group, lr)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x, targets = self.mixer(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            micro, after_backward = self.noise.begin_step(i, x.shape[0], self.micro_batch)
            backward = functools.partial(
                forward_backward,
                self._training_model(),
                x,
                targets,
                micro,
                cfg.augment.label_smoothing,
                self.mc_fisher,
                self.memory_format,
                cfg.train.precision,
                self.scaler,
            )
            # SAM's second pass reuses ``backward``; only this first one is measured.
            local_loss, local_hits = backward(after_backward=after_backward)
            # One collective averages gradients and sums the step's metrics over ranks.
            count = torch.full((), float(x.shape[0]), dtype=torch.float64, device=self.device)
            extras = [local_loss, local_hits, count, *self.noise.local_terms(x.shape[0])]
            reduced = self.parallel.reduce_step(self.model, x.shape[0], extras)
            batch = torch.stack(reduced[:3])
            self.noise.end_step(reduced[3:], batch[2], self.scaler)
            if self.sam is not None:  # the gradient at SAM's ascent point replaces this one
                reduce = functools.partial(self.parallel.reduce_step, self.model, x.shape[0], [])
                self.sam.replace_gradient(backward, reduce, skip_overflow=self.scaler.is_enabled())
            self.scaler.unscale_(self.optimizer)
            adapting = self.kfac is not None and self.kfac.adaptation_due()
            before = AdaptiveDamping.capture(self.model) if adapting else None
            if self.kfac is not None:
                # Its G came from scaled gradients; an overflowed step's statistics are skipped.
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
                self.kfac.step(lr=lr, grad_scale=scale)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if before is not None:
                adapt_kfac_damping(self, x, targets, before)
            step += 1
            totals += batch.to(torch.float64)
            bar.update()
            if show and i % 10 == 0:  # a host read only when someone watches
                bar.set_postfix(loss=f"{float(batch[0] / batch[2]):.3f}", lr=f"{lr:.2e}")
        bar.close()
        loss_sum, hits, seen = totals.tolist()  # the epoch's one read of them
        elapsed = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": hits / seen,
            "epoch_time": elapsed,
            "images_per_sec": seen / elapsed,
            **self.noise.epoch_metrics(),
        }
