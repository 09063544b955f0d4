"""The ``bigbatch`` command: train | report (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigbatch.errors import BigbatchError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (every key has a default)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set optimizer.lr=0.01 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from bigbatch.config import load_config
    from bigbatch.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    rows = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    if trainer.parallel.is_main:
        last = rows[-1]
        print(
            f"finished {cfg.run.name}: test acc {last['test_acc']:.4f}, test loss {last['test_loss']:.4f} "
            f"after {last['epoch']} epochs ({last['train_time']:.0f}s training)\nresults in {trainer.run_dir}/"
        )
    return 0


def _study_report(study, command: str) -> Path:
    from bigbatch.report.report import load_run, write_report

    runs = [r for r in (load_run(run.run_dir, run.label) for run in study.runs) if r is not None]
    if not runs:
        raise BigbatchError(f"no run of study '{study.name}' has metrics yet under {study.output_dir}; run `bigbatch reproduce` first")
    missing = len(study.runs) - len(runs)
    notes = study.description + (f"\n\n**{missing} of {len(study.runs)} runs have no results yet.**" if missing else "")
    return write_report(runs, study.output_dir / "report", title=f"Study: {study.name}", target=study.target_accuracy,
                        command=command, notes=notes.strip())


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bigbatch.experiments.grid import load_study, run_study

    if not args.config:
        raise BigbatchError("reproduce needs a study config, e.g. bigbatch reproduce configs/quick.toml")
    study = load_study(args.config, args.overrides, seeds=args.seeds)
    print(f"study {study.name}: {len(study.runs)} runs under {study.output_dir}/", flush=True)
    if not args.report_only:
        run_study(study)
    report = _study_report(study, " ".join(["bigbatch reproduce", args.config, *(f"--set {o}" for o in args.overrides)]))
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bigbatch.report.plots import plot_run_curves
    from bigbatch.train.checkpoint import read_jsonl

    for run_dir in map(Path, args.run_dirs):
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if not rows:
            raise BigbatchError(f"'{run_dir}' has no metrics.jsonl rows; is it a bigbatch run directory?")
        plot_run_curves(rows, run_dir / "curves.png", title=run_dir.name)
        print(f"wrote {run_dir / 'curves.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one run from a config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint if there is one")
    p.add_argument("--overwrite", action="store_true", help="start again from scratch over an existing run directory")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("reproduce", help="run (or resume) every run of a study config, then write its report")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", help="run these seeds instead of the study's [study] seeds")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing runs")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("report", help="redraw the loss/accuracy curves of run directories")
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
