"""The cost of the redesign, measured in one run: an old source tree against this checkout's.

Runs benchmarks/bench_parts.py in a fresh process per (tree, part, round), with PYTHONPATH set to
--baseline-src or to this checkout's src, the same interpreter and torch for both; rounds
interleave the trees (the order flips every round) so that a slow spell of a shared machine hits
both alike. Prints, per measured row, the median seconds of each tree over the rounds and the
ratio new / baseline, then the peak resident memory of each part's processes.

For resnet20 the baseline is measured twice, with run.retain_memory=true and by default, against
the new tree's default: what removing that opt-in costs, and what the rest of the change costs.

    git worktree add /tmp/old 3547a31   # the last commit with the single-CPU speed tricks
    .venv/bin/python benchmarks/compare_commits.py --baseline-src /tmp/old/src [--rounds 3]
        [--parts sgd kfac stats landscape resnet20] [--data PATH] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_DATA, REPO_ROOT, bar, header, ratio, table

WORKER = Path(__file__).resolve().with_name("bench_parts.py")
PARTS = ("sgd", "kfac", "stats", "landscape", "resnet20")
# Sizes for a smoke test of the machinery: seconds per process, numbers without meaning.
TINY = [
    "--train-examples=1024",
    "--epochs=1",
    "--stats-examples",
    "64",
    "256",
    "--min-seconds=0.1",
    "--landscape-train=512",
    "--landscape-test=256",
    "--resnet-examples=512",
    "--resnet-batch=256",
]


def variants(part: str) -> list[tuple[str, str, list[str]]]:
    """(tree, variant, extra worker options) of one part; variant names the baseline's setting."""
    if part == "resnet20":
        return [
            ("baseline", "run.retain_memory=true", ["--retain-memory"]),
            ("baseline", "default", []),
            ("new", "default", []),
        ]
    return [("baseline", "", []), ("new", "", [])]


def provenance(src: Path) -> str:
    """The commit a source tree is at, and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"{src} (not a git checkout)"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", ".") else ""
    return f"{src} ({commit}{dirty})"


def run_worker(src: Path, part: str, options: list[str], cwd: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run(
        [sys.executable, str(WORKER), part, *options],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # A bigbatch from elsewhere (an installed copy ahead on the path) would compare nothing.
    if Path(report["bigbatch"]) != (src / "bigbatch").resolve():
        return {"error": [f"imported {report['bigbatch']}, not the one under {src}"]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-src", required=True, type=Path, help="e.g. /tmp/old/src")
    parser.add_argument("--new-src", type=Path, default=REPO_ROOT / "src")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (meaningless times)")
    parser.add_argument(
        "--worker-options", default="", help="more bench_parts.py options, e.g. '--epochs 3'"
    )
    args = parser.parse_args()
    srcs = {"baseline": args.baseline_src.resolve(), "new": args.new_src.resolve()}
    for tree, src in srcs.items():
        if not (src / "bigbatch" / "__init__.py").is_file():
            parser.error(f"--{tree}-src {src} holds no bigbatch package")
    # Absolute, since the workers run in a scratch directory.
    options = [
        "--data",
        os.path.abspath(args.data),
        *(TINY if args.tiny else []),
        *shlex.split(args.worker_options),
    ]

    # seconds[(part, variant, row)][tree] and peak memory per (part, tree, variant), over rounds
    seconds: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    memory: dict[tuple[str, str, str], list[float]] = {}
    failures: list[str] = []
    jobs = [(r, p, v) for r in range(args.rounds) for p in args.parts for v in variants(p)]
    progress = bar(len(jobs), "processes")
    with tempfile.TemporaryDirectory() as cwd:
        for rnd in range(args.rounds):
            for part in args.parts:
                order = variants(part)
                for tree, variant, extra in order if rnd % 2 == 0 else order[::-1]:
                    progress.set_postfix_str(f"round {rnd + 1} {part} {tree} {variant}".strip())
                    report = run_worker(srcs[tree], part, options + extra, cwd)
                    progress.update()
                    if "error" in report:
                        failures.append(f"{part} {tree} {variant}: {report['error'][-1]}")
                        continue
                    memory.setdefault((part, tree, variant), []).append(report["peak_rss_mib"])
                    for row, value in report["rows"].items():
                        # Every baseline variant of a part is compared with the new tree's one run.
                        keys = (
                            [(part, variant, row)]
                            if tree == "baseline"
                            else [(part, v, row) for t, v, _ in variants(part) if t == "baseline"]
                        )
                        for key in keys:
                            seconds.setdefault(key, {"baseline": [], "new": []})[tree].append(value)
    progress.close()

    print(header("Cost of the redesign: baseline tree vs new tree, interleaved rounds"))
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"baseline: {provenance(srcs['baseline'])}")
    print(f"new: {provenance(srcs['new'])}")
    print(f"Medians over {args.rounds} round(s), each a fresh process per tree and part.\n")
    rows = []
    for (_part, variant, row), by_tree in seconds.items():
        old, new = by_tree["baseline"], by_tree["new"]
        label = f"{row} (baseline: {variant})" if variant else row
        old_s = statistics.median(old) if old else float("nan")
        new_s = statistics.median(new) if new else float("nan")
        rows.append(
            [label, f"{old_s:.4g}", f"{new_s:.4g}", ratio(new_s, old_s) if old and new else "n/a"]
        )
    print(table(["part", "baseline s", "new s", "new/baseline"], rows))
    print("\nPeak resident memory of each process (median MiB):\n")
    mem_rows = [
        [part, tree + (f" ({variant})" if variant else ""), f"{statistics.median(v):.0f}"]
        for (part, tree, variant), v in memory.items()
    ]
    print(table(["part", "tree", "peak MiB"], mem_rows))
    if failures:
        print("\nFailed processes:\n" + "\n".join(f"- {f}" for f in failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
