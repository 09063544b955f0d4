"""The ``bigbatch`` command: train | reproduce | sweep | landscape | sharpness | report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bigbatch.errors import BigbatchError, CollectiveError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (every key has a default)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set optimizer.lr=0.01 (repeatable)",
    )


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    """The options `reproduce` and `sweep` share."""
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from existing runs"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each on its share of the CPU threads",
    )
    p.add_argument(
        "--output-dir",
        help="put the runs and report here instead of the file's output_dir",
    )


def _made_by(command: str, args: argparse.Namespace) -> str:
    """The command line that makes these runs and report again, for the report's header."""
    words = ["bigbatch", command, args.config]
    if getattr(args, "seeds", None):
        words += ["--seeds", *map(str, args.seeds)]
    if args.output_dir:
        words += ["--output-dir", args.output_dir]
    for override in args.overrides:
        words += ["--set", override]
    return " ".join(shlex.quote(word) for word in words)


def cmd_train(args: argparse.Namespace) -> int:
    from bigbatch.config import load_config
    from bigbatch.train.distributed import init_parallel, shutdown_parallel
    from bigbatch.train.state import fix_cublas_workspace
    from bigbatch.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.deterministic:
        fix_cublas_workspace()
    parallel = init_parallel(cfg.runtime.dist_timeout, cfg.runtime.device)
    try:
        trainer = Trainer(cfg, parallel=parallel)
        rows = trainer.fit(
            resume=args.resume, overwrite=args.overwrite, allow_change=tuple(args.allow_change)
        )
    except CollectiveError as exc:
        # The process group is broken: tearing it down (or letting the interpreter do so at exit)
        # can abort in gloo's C++ destructors while a peer is hung. Checkpoints and metrics are
        # already on disk (written atomically), so report and leave at once.
        print(f"bigbatch: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    finally:
        shutdown_parallel()
    if trainer.parallel.is_main:
        from bigbatch.report.plots import plot_run_curves

        plot_run_curves(rows, trainer.run_dir / "curves.png", title=cfg.run.name)
        last = rows[-1]
        print(
            f"finished {cfg.run.name}: test acc {last['test_acc']:.4f}, test loss "
            f"{last['test_loss']:.4f} "
            f"after {last['epoch']} epochs ({last['train_time']:.0f}s training)\nresults in "
            f"{trainer.run_dir}/"
        )
    if parallel.world_size > 1:
        # Skip interpreter finalization: destroying torch.distributed's C++ objects there aborted
        # about one two-rank run in ten ("terminate called without an active exception") after all
        # results were written. The group is already destroyed and every file closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bigbatch.experiments.grid import load_study, run_study
    from bigbatch.experiments.study_report import write_study_report

    if not args.config:
        raise BigbatchError(
            "reproduce needs a study config, e.g. bigbatch reproduce configs/quick.toml"
        )
    study = load_study(args.config, args.overrides, seeds=args.seeds, output_dir=args.output_dir)
    print(f"study {study.name}: {len(study.runs)} runs under {study.output_dir}/", flush=True)
    if not args.report_only:
        run_study(study, jobs=args.jobs)
    report = write_study_report(study, _made_by("reproduce", args))
    print(f"report: {report}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bigbatch.experiments.sweep import load_sweep, run_sweep
    from bigbatch.experiments.sweep_results import write_report

    if not args.config:
        raise BigbatchError(
            "sweep needs a sweep file, e.g. bigbatch sweep configs/sweep-lenet5.toml"
        )
    sweep = load_sweep(args.config, args.overrides, output_dir=args.output_dir)
    print(f"sweep {sweep.name}: {len(sweep.cells())} cells under {sweep.output_dir}/", flush=True)
    if not args.report_only:
        run_sweep(sweep, jobs=args.jobs)
    print(f"report: {write_report(sweep, _made_by('sweep', args))}")
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    from bigbatch.analysis.commands import landscape

    written = landscape(
        args.run_dirs,
        start=args.range[0],
        stop=args.range[1],
        points=args.points,
        normalization=args.normalization,
        seed=args.seed,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        batch_size=args.batch_size,
        interpolate=args.interpolate,
        two_d=args.two_d,
        out=args.out,
        device=args.device,
    )
    print("wrote:\n  " + "\n  ".join(map(str, written)))
    return 0


def cmd_sharpness(args: argparse.Namespace) -> int:
    import json

    from bigbatch.analysis.commands import sharpness

    path = sharpness(
        args.run_dir,
        examples=args.examples,
        top_k=args.top_k,
        lanczos_steps=args.lanczos_steps,
        trace_samples=args.trace_samples,
        epsilon=args.epsilon,
        ascent_steps=args.ascent_steps,
        seed=args.seed,
        device=args.device,
    )
    result = json.loads(path.read_text())
    print(
        f"top Hessian eigenvalues {[f'{v:.4g}' for v in result['top_eigenvalues']]}, "
        f"trace {result['trace']:.4g} ± {result['trace_stderr']:.2g}, "
        f"epsilon-sharpness {result['epsilon_sharpness']:.4g} (eps={args.epsilon:g}) on "
        f"{result['settings']['examples']} "
        f"training examples\nwrote {path}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bigbatch.io import read_jsonl
    from bigbatch.report.plots import plot_run_curves

    for run_dir in map(Path, args.run_dirs):
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if not rows:
            raise BigbatchError(
                f"'{run_dir}' has no metrics.jsonl rows; is it a bigbatch run directory?"
            )
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("epoch"), int)), None)
        if bad is not None:
            raise BigbatchError(
                f"'{run_dir / 'metrics.jsonl'}' row {bad} has no integer \"epoch\"; it is not a "
                "bigbatch metrics file (or was edited); `bigbatch train CONFIG --resume` "
                "rewrites it from the checkpoint"
            )
        plot_run_curves(rows, run_dir / "curves.png", title=run_dir.name)
        print(f"wrote {run_dir / 'curves.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one run from a config")
    _add_config_args(p)
    start = p.add_mutually_exclusive_group()  # continuing a run and replacing it contradict
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's last checkpoint if there is one",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start again from scratch over an existing run directory",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="SECTION.KEY",
        help="with --resume: let this experiment key differ from the checkpoint's, e.g. a lower "
        "optimizer.lr after a divergence (recorded in metrics.jsonl; repeatable)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "reproduce", help="run (or resume) every run of a study config, then write its report"
    )
    _add_config_args(p)
    p.add_argument(
        "--seeds", type=int, nargs="+", help="run these seeds instead of the study's [study] seeds"
    )
    _add_grid_args(p)
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser(
        "sweep",
        help="batch sizes x optimizers, each cell's lr tuned, the best rerun on more seeds; then "
        "the scaling report",
    )
    _add_config_args(p)
    _add_grid_args(p)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser(
        "landscape", help="1-D/2-D loss landscape around trained runs, or interpolation between two"
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--range", type=float, nargs=2, default=(-0.5, 1.5), metavar=("START", "STOP"))
    p.add_argument("--points", type=int, default=41)
    p.add_argument(
        "--normalization",
        choices=("none", "filter"),
        default="none",
        help="none: plain Gaussian direction (the paper's); filter: Li et al. 2018 filter-wise "
        "normalization",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random direction (the same for every run)"
    )
    p.add_argument("--train-examples", type=int, default=0, help="0: the whole training set")
    p.add_argument("--test-examples", type=int, default=0, help="0: the whole test set")
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="examples per evaluation batch (results do not depend on it beyond float rounding)",
    )
    p.add_argument(
        "--interpolate", action="store_true", help="linear path between two runs' solutions instead"
    )
    p.add_argument("--two-d", action="store_true", help="a 2-D contour over two random directions")
    p.add_argument(
        "--out", help="where the overlay or interpolation plot goes (default: beside the runs)"
    )
    p.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    p.set_defaults(func=cmd_landscape)
    p = sub.add_parser(
        "sharpness", help="top Hessian eigenvalues, Hessian trace and epsilon-sharpness of a run"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--examples", type=int, default=10000, help="training examples the loss is measured on"
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-steps", type=int, default=20)
    p.add_argument("--trace-samples", type=int, default=20)
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--ascent-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    p.set_defaults(func=cmd_sharpness)
    p = sub.add_parser(
        "report",
        help="redraw the loss/accuracy curves (and gradient noise scale) of run directories",
    )
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BigbatchError as exc:
        print(f"bigbatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bigbatch: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
