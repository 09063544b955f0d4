"""Bad inputs and faults, as a demanding new user makes them: each case runs the real command and
must end with its exit status, a message naming the problem (a keyword of it is checked), no
traceback, and nothing changed outside the run directory it names.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigbatch.cli import main as cli_main

TINY = [
    "data.format=synthetic",
    "data.train_limit=64",
    "data.test_limit=32",
    "run.epochs=1",
    "train.batch_size=32",
    "runtime.progress=off",
]


@dataclass
class Workspace:
    root: Path  # the user's working directory: nothing here may change but the named run dir
    run: Path  # a finished one-epoch synthetic run under root/runs

    def train(self, *sets: str, name: str = "fresh", config: str | None = None) -> list[str]:
        out = [f"runtime.output_dir={self.root / 'runs'}", f"run.name={name}"]
        argv = ["train"] + ([config] if config else [])
        for s in [*TINY, *out, *sets]:
            argv += ["--set", s]
        return argv

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)


def _folder_dataset(root: Path, classes: list[str]) -> str:
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(d / f"{i}.png")
    return str(root)


def _idx_dataset(root: Path, label_value: int) -> str:
    root.mkdir()
    for split, n in (("train", 8), ("t10k", 4)):
        images = np.zeros((n, 28, 28), np.uint8)
        labels = np.full(n, label_value, np.uint8)
        labels[0] = 0
        header = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.tobytes())
        )
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes())
        )
    return str(root)


def _trained(ws: Workspace, name: str, *sets: str) -> Path:
    assert cli_main(ws.train(*sets, name=name)) == 0
    return ws.root / "runs" / name


def _with_checkpoint(ws: Workspace, state: object) -> str:
    torch.save(state, ws.run / "checkpoint.pt")
    return str(ws.run)


def _foreign_weights(ws: Workspace) -> str:
    state = torch.load(ws.run / "checkpoint.pt", weights_only=True)
    state["model"] = {"conv1.weight": torch.zeros(3, 3)}
    return _with_checkpoint(ws, state)


def _other_model(ws: Workspace) -> str:
    other = ws.root / "runs" / "other"
    shutil.copytree(ws.run, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["name"] = "resnet20"
    (other / "config.json").write_text(json.dumps(cfg))
    return str(other)


def _study(ws: Workspace, study_line: str) -> list[str]:
    path = ws.file(
        "study.toml",
        f'[study]\nname = "s"\n{study_line}\n[base.data]\nformat = "synthetic"\n'
        '[[runs]]\nname = "a"\n',
    )
    return ["reproduce", path, "--output-dir", str(ws.root / "study")]


Case = Callable[[Workspace], list[str]]
CASES: dict[str, tuple[Case, int, str]] = {
    # config files and keys
    "config not UTF-8": (lambda ws: ["train", ws.file("c.toml", b"\xff\xfe[run]\n")], 2, "UTF-8"),
    "config is a directory": (lambda ws: ["train", str(ws.root)], 2, "directory"),
    "config missing": (lambda ws: ["train", str(ws.root / "nope.toml")], 2, "nope.toml"),
    "config bad TOML": (lambda ws: ["train", ws.file("c.toml", "[run\n")], 2, "TOML"),
    "unknown key": (lambda ws: ws.train("train.batchsize=3"), 2, "train.batchsize"),
    "moved key": (lambda ws: ws.train("run.device=cpu"), 2, "runtime.device"),
    "negative lr": (lambda ws: ws.train("optimizer.lr=-1"), 2, "optimizer.lr"),
    "infinite lr": (lambda ws: ws.train("optimizer.lr=inf"), 2, "'optimizer.lr' must be a finite"),
    "infinite mixup alpha": (lambda ws: ws.train("augment.mixup_alpha=inf"), 2, "finite"),
    "nan damping": (lambda ws: ws.train("kfac.damping=nan"), 2, "kfac.damping"),
    "wrong type": (lambda ws: ws.train('train.batch_size="big"'), 2, "train.batch_size"),
    "bad skip_layers regex": (
        lambda ws: ws.train('optimizer.name="kfac"', 'kfac.skip_layers=["conv[1"]'),
        2,
        "skip_layers",
    ),
    "SAM around K-FAC": (
        lambda ws: ws.train('optimizer.name="kfac"', "optimizer.sam_rho=0.05"),
        2,
        "cannot wrap optimizer.name='kfac'",
    ),
    "negative sam_rho": (lambda ws: ws.train("optimizer.sam_rho=-0.1"), 2, "optimizer.sam_rho"),
    "adaptive damping outside its bounds": (
        lambda ws: ws.train("kfac.adaptive_damping=true", "kfac.max_damping=1e-3"),
        2,
        "within [min_damping, max_damping]",
    ),
    "unknown BatchNorm curvature": (lambda ws: ws.train('kfac.batchnorm="full"'), 2, "unit"),
    "grad_worker_fraction above 1": (
        lambda ws: ws.train("kfac.grad_worker_fraction=2"),
        2,
        "kfac.grad_worker_fraction",
    ),
    "unknown optimizer": (lambda ws: ws.train('optimizer.name="larz"'), 2, "did you mean 'lars'"),
    "zero lars_trust": (lambda ws: ws.train("optimizer.lars_trust=0"), 2, "optimizer.lars_trust"),
    "beta2 of 1": (lambda ws: ws.train("optimizer.beta2=1.0"), 2, "optimizer.beta2"),
    "unknown muon_rest": (
        lambda ws: ws.train('optimizer.muon_rest="adam"'),
        2,
        "choose one of: sgd, adamw",
    ),
    "too many Newton-Schulz steps": (
        lambda ws: ws.train("optimizer.muon_ns_steps=100"),
        2,
        "optimizer.muon_ns_steps",
    ),
    "ghost batch norm on lenet5": (
        lambda ws: ws.train("model.ghost_batch_size=16"),
        2,
        "lenet5 has no BatchNorm",
    ),
    "micro-batch cuts a ghost batch": (
        lambda ws: ws.train(
            'model.name="resnet20"', "model.ghost_batch_size=8", "runtime.micro_batch_size=12"
        ),
        2,
        "not a multiple of model.ghost_batch_size",
    ),
    "infinite dist_timeout": (
        lambda ws: ws.train("runtime.dist_timeout=inf"),
        2,
        "'runtime.dist_timeout' must be a finite",
    ),
    "max_loss_factor below 1": (
        lambda ws: ws.train("runtime.max_loss_factor=0.5"),
        2,
        "max_loss_factor",
    ),
    "cuda without CUDA": (lambda ws: ws.train('runtime.device="cuda"'), 2, "CUDA"),
    "not a device": (lambda ws: ws.train('runtime.device="tpu9"'), 2, "runtime.device"),
    "batch larger than data": (lambda ws: ws.train("train.batch_size=4096"), 2, "batch_size"),
    "crop padding too large": (lambda ws: ws.train("augment.crop_padding=64"), 2, "crop_padding"),
    "negative noise-scale split interval": (
        lambda ws: ws.train("train.noise_scale_split_every=-1"),
        2,
        "'train.noise_scale_split_every' must be >= 0 (0: never split",
    ),
    "run.name ..": (lambda ws: ws.train(name=".."), 2, "run.name"),
    "run.name with /": (lambda ws: ws.train(name="a/b"), 2, "run.name"),
    "run.name too long": (lambda ws: ws.train(name="x" * 300), 2, "run.name"),
    # data
    "data path missing": (
        lambda ws: ws.train('data.format="image-folder"', f"data.path={ws.root / 'no.zip'!s}"),
        2,
        "no.zip",
    ),
    "one class": (
        lambda ws: ws.train(
            'data.format="image-folder"',
            f"data.path={_folder_dataset(ws.root / 'one', ['cat'])}",
            "data.train_limit=0",
            "data.test_limit=0",
            "train.batch_size=2",
        ),
        2,
        "class",
    ),
    "IDX labels outside classes": (
        lambda ws: ws.train(
            f"data.path={_idx_dataset(ws.root / 'idx', 12)}",
            'data.format="auto"',
            "data.train_limit=0",
            "data.test_limit=0",
            "train.batch_size=2",
        ),
        2,
        "label",
    ),
    # output dirs and existing runs
    "output dir is a file": (
        lambda ws: ws.train(f"runtime.output_dir={ws.file('afile', 'x')}"),
        2,
        "output_dir",
    ),
    "output dir on a read-only filesystem": (
        lambda ws: ws.train("runtime.output_dir=/proc/bigbatch-runs"),
        2,
        "runtime.output_dir",
    ),
    "existing run without --resume": (lambda ws: ws.train(name="r"), 2, "--resume"),
    "resume with fewer epochs than done": (
        lambda ws: [
            *ws.train("run.epochs=1", name=_trained(ws, "two", "run.epochs=2").name),
            "--resume",
        ],
        2,
        "run.epochs >= 2",
    ),
    "allow-change of a non-key": (
        lambda ws: [*ws.train(name="r"), "--resume", "--allow-change", "optimizer.rate"],
        2,
        "optimizer.rate",
    ),
    "allow-change without resume": (
        lambda ws: [*ws.train(name="new"), "--allow-change", "optimizer.lr"],
        2,
        "--resume",
    ),
    "resume with changed config": (
        lambda ws: [*ws.train("optimizer.lr=0.5", name="r"), "--resume"],
        2,
        "optimizer.lr",
    ),
    # checkpoints
    "resume from wrong structure": (
        lambda ws: [*ws.train(name="r"), "--resume"] if _with_checkpoint(ws, {"x": 1}) else [],
        2,
        "checkpoint",
    ),
    "resume from another model's weights": (
        lambda ws: (
            [
                *ws.train(
                    "data.train_limit=256", "data.test_limit=128", "train.batch_size=64", name="r"
                ),
                "--resume",
            ]
            if _foreign_weights(ws)
            else []
        ),
        2,
        "does not fit",
    ),
    "landscape on wrong structure": (
        lambda ws: ["landscape", _with_checkpoint(ws, [1, 2]), "--points", "3"],
        2,
        "checkpoint",
    ),
    "sharpness on wrong structure": (
        lambda ws: ["sharpness", _with_checkpoint(ws, {"model": 3})],
        2,
        "checkpoint",
    ),
    "sharpness on another model's checkpoint": (
        lambda ws: ["sharpness", _other_model(ws), "--examples", "32"],
        2,
        "model",
    ),
    "landscape on a non-run": (lambda ws: ["landscape", str(ws.root)], 2, "config.json"),
    "interpolate incompatible runs": (
        lambda ws: [
            "landscape",
            str(ws.run),
            str(_trained(ws, "res", 'model.name="resnet20"')),
            "--interpolate",
        ],
        2,
        "same model",
    ),
    "landscape on mismatched config and weights": (
        lambda ws: ["landscape", _other_model(ws)],
        2,
        "do not fit",
    ),
    # analysis options, validated before any computation
    # (each names its option: the message must too)
    **{
        f"{command} {' '.join(values)}": (
            lambda ws, command=command, values=values: [command, str(ws.run), *values],
            2,
            values[0],
        )
        for command, values in [
            ("sharpness", ("--trace-samples", "0")),
            ("sharpness", ("--epsilon", "-1")),
            ("sharpness", ("--ascent-steps", "0")),
            ("sharpness", ("--lanczos-steps", "0")),
            ("sharpness", ("--top-k", "0")),
            ("sharpness", ("--examples", "-5")),
            ("landscape", ("--range", "nan", "1")),
            ("landscape", ("--train-examples", "-1")),
            ("landscape", ("--points", "0")),
        ]
    },
    "sharpness --device cuda without CUDA": (
        lambda ws: (
            ["sharpness", str(ws.run), "--device", "cuda"]
            if not torch.cuda.is_available()
            else ["sharpness", str(ws.run), "--device", "cuda:99"]
        ),
        2,
        "runtime.device",
    ),
    # reports and studies
    "report on rows without epoch": (
        lambda ws: ["report", ws.file("runs/r/metrics.jsonl", '{"loss": 1}\n') and str(ws.run)],
        2,
        "epoch",
    ),
    "report on a corrupt metrics line": (
        lambda ws: [
            "report",
            ws.file("runs/r/metrics.jsonl", '{"epoch": 1}\n{"ep\n') and str(ws.run),
        ],
        2,
        "--resume",
    ),
    "study target not a number": (
        lambda ws: _study(ws, 'target_accuracy = "high"'),
        2,
        "target_accuracy",
    ),
    "study flatness distance not positive": (
        lambda ws: _study(ws, "flatness = true\nflatness_distance = -0.1"),
        2,
        "flatness_distance",
    ),
    "study without runs": (
        lambda ws: ["reproduce", ws.file("s.toml", '[study]\nname = "s"\n')],
        2,
        "runs",
    ),
    "study unknown table": (
        lambda ws: ["reproduce", ws.file("s.toml", '[studdy]\nname = "s"\n')],
        2,
        "studdy",
    ),
    "sweep key misspelt": (
        lambda ws: ["sweep", ws.file("sw.toml", "[sweep]\ntarget_acuracy = 0.6\n")],
        2,
        "did you mean 'target_accuracy'",
    ),
    "sweep without optimizers": (
        lambda ws: [
            "sweep",
            ws.file(
                "sw.toml",
                "[sweep]\ntarget_accuracy = 0.6\nbatch_sizes = [32]\nmax_epochs = 1\n"
                "lr_factors = [1]\n",
            ),
        ],
        2,
        "[optimizers.NAME]",
    ),
    "sweep budget not a number": (
        lambda ws: [
            "sweep",
            ws.file(
                "sw.toml",
                '[sweep]\ntarget_accuracy = 0.6\nbatch_sizes = [32]\nmax_epochs = "long"\n'
                'lr_factors = [1]\n[optimizers.sgd]\noptimizer = { name = "sgd", lr = 0.1 }\n',
            ),
        ],
        2,
        "max_epochs",
    ),
}


def _snapshot(root: Path, skip: Path) -> dict[str, float]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


@pytest.fixture
def workspace(synthetic_run: Path) -> Workspace:
    return Workspace(synthetic_run.parent.parent, synthetic_run)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_message(name, workspace, capsys, monkeypatch):
    make_argv, code, keyword = CASES[name]
    monkeypatch.chdir(workspace.root)
    argv = make_argv(workspace)
    before = _snapshot(workspace.root, workspace.root / "runs")
    try:
        got = cli_main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    err = capsys.readouterr().err
    assert got == code, err
    assert keyword.lower() in err.lower(), err
    assert "Traceback" not in err
    after = _snapshot(workspace.root, workspace.root / "runs")
    assert after == before, f"changed outside runs/: {set(after) ^ set(before)}"
