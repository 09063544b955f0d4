"""Real 2-process gloo runs of `bigbatch train`, compared with a single process on the same
global batch."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bigbatch.io import read_jsonl
from bigbatch.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMMON = [
    "data.format=synthetic",
    "data.train_limit=600",
    "data.test_limit=200",
    "train.batch_size=64",
    "runtime.progress=off",
    "train.train_eval_examples=200",
    "runtime.threads=1",
    "optimizer.lr=0.05",
]


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+): between this check and rank 0 binding it,
    no outgoing connection (gloo opens many) can be given it, as could happen to a port from
    bind(0)."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def _args(out, name, extra, flags=()):
    sets = [*COMMON, f"runtime.output_dir={out}", f"run.name={name}", *extra]
    return [sys.executable, "-m", "bigbatch", "train", *flags] + [
        a for s in sets for a in ("--set", s)
    ]


def _launch(out, name, extra, world_size, port, flags=(), per_rank=lambda rank: []):
    """``per_rank(rank)``: extra --set values of that rank only."""
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                _args(out, name, [*extra, *per_rank(rank)], flags),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=240):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return outs


def _compare(tmp_path, extra, epochs):
    extra = [*extra, f"run.epochs={epochs}"]
    # The single process runs each half batch as one micro-batch, and evaluates each half of an
    # evaluation batch as one batch, as each rank does, so both do the same float32 arithmetic per
    # example. Otherwise rounding differences can flip the winner of a near-tie in a max-pooling
    # window, which moves that gradient to another pixel (an O(1) change that K-FAC carries into
    # every later step), or the argmax of a test example at a near-tie.
    half = ["runtime.micro_batch_size=32", "runtime.eval_batch_size=100"]
    single = subprocess.run(
        _args(tmp_path, "single", [*extra, *half]),
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert single.returncode == 0, single.stderr
    _finish(_launch(tmp_path, "two", extra, 2, _free_port()))
    a, b = (
        read_jsonl(tmp_path / "single" / "metrics.jsonl"),
        read_jsonl(tmp_path / "two" / "metrics.jsonl"),
    )
    assert len(a) == len(b) == epochs
    for ra, rb in zip(a, b):
        assert rb["world_size"] == 2 and rb["bytes_communicated"] > 0
        assert rb["hardware"] == f"2 x {ra['hardware']}"  # one process and thread each
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "train_eval_loss", "step"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    pa = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    pb = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two" / "checkpoint.pt.tmp").exists()


def test_one_sgd_step_on_two_ranks_equals_one_process(tmp_path):
    # 601 examples would leave an uneven last batch; one step of 64 examples, then compare weights.
    _compare(tmp_path, ["data.train_limit=64"], epochs=1)


def test_short_sgd_run_on_two_ranks_equals_one_process(tmp_path):
    # 600 / 64: the last batch (24 examples) is split 12/12; crop/flip randomness is drawn globally.
    _compare(tmp_path, ["augment.crop_flip=true"], epochs=2)


def test_sam_on_two_ranks_equals_one_process(tmp_path):
    # SAM's ascent uses the all-reduced gradient (train/sam.py): the global batch's SAM step.
    _compare(tmp_path, ["data.train_limit=128", "optimizer.sam_rho=0.1"], epochs=1)


def test_noise_scale_from_two_ranks_equals_one_process_on_the_same_halves(tmp_path):
    # Each rank's local gradient (before the all-reduce) against the single process's micro-batch
    # of the same half, every step; the last batch (24) is split 12/12 in both.
    _compare(tmp_path, ["train.noise_scale_split_every=1", "optimizer.lr=0.02"], epochs=2)
    a, b = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("single", "two"))
    for ra, rb in zip(a, b):
        assert ra["noise_scale_steps"] == rb["noise_scale_steps"] == 10
        assert ra["grad_noise_scale"] is not None
        for key in ("grad_noise_scale", "grad_norm_sq", "grad_trace_sigma"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), key


def test_killed_rank_ends_the_other_with_a_clear_error(tmp_path):
    extra = [
        "run.epochs=50",
        "runtime.dist_timeout=20",
        "data.train_limit=3000",
        "train.batch_size=32",
    ]
    procs = _launch(tmp_path, "kill", extra, 2, _free_port())
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "kill" / "checkpoint.pt").exists():
        time.sleep(0.1)
    assert (tmp_path / "kill" / "checkpoint.pt").exists(), (
        procs[0].stderr.read() if procs[0].poll() is not None else "no checkpoint"
    )
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 2
    assert time.time() - start < 40
    assert "Another rank died or hung" in err and "--resume" in err
    assert "Traceback" not in err
    # The last checkpoint survives and a restarted job resumes from it.
    epoch = load_checkpoint(tmp_path / "kill" / "checkpoint.pt")["epoch"]
    assert epoch >= 1
    procs[1].communicate()
    resumed = _launch(
        tmp_path,
        "kill",
        [*extra[1:], f"run.epochs={epoch + 1}"],
        2,
        _free_port(),
        flags=["--resume"],
    )
    _finish(resumed)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "kill" / "metrics.jsonl")] == list(
        range(1, epoch + 2)
    )


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer.name=sgd"],
        # K-FAC communicates factors every step and eigenbases every other step: a hang in any
        # of its collectives too.
        ["optimizer.name=kfac", "kfac.factor_interval=1", "kfac.inverse_interval=2"],
    ],
)
def test_hung_rank_ends_the_other_within_the_timeout(tmp_path, optimizer):
    extra = [
        "run.epochs=50",
        "runtime.dist_timeout=10",
        "data.train_limit=3000",
        "train.batch_size=32",
        *optimizer,
    ]
    procs = _launch(tmp_path, "hang", extra, 2, _free_port())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "hang" / "checkpoint.pt").exists():
            time.sleep(0.1)
        assert (tmp_path / "hang" / "checkpoint.pt").exists()
        procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can notice
        start = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 2, err
        assert time.time() - start < 60
        assert "Another rank died or hung" in err and "Traceback" not in err, err
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate()


@pytest.mark.parametrize("upper", ["true", "false"])
def test_kfac_on_two_ranks_equals_one_process(tmp_path, upper):
    # Empirical Fisher, statistics every step and eigendecompositions every 2 steps, so both the
    # factor all-reduce and the rank-assigned, broadcast eigendecompositions are exercised.
    _compare(
        tmp_path,
        [
            "optimizer.name=kfac",
            "kfac.factor_interval=1",
            "kfac.inverse_interval=2",
            f"kfac.upper_triangle={upper}",
            "data.train_limit=256",
        ],
        epochs=1,
    )
    rows = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert rows[0]["kfac_factor_bytes"] > 0 and rows[0]["kfac_communication_time"] > 0


def test_ranks_started_with_different_configs_refuse_to_train(tmp_path):
    procs = _launch(
        tmp_path,
        "mixed",
        ["run.epochs=1"],
        2,
        _free_port(),
        per_rank=lambda rank: ["optimizer.lr=0.1"] if rank == 1 else [],
    )
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "different configs" in err and "Traceback" not in err, err
    assert not (tmp_path / "mixed" / "checkpoint.pt").exists()


def test_ranks_without_a_shared_disk_resume_from_rank_0s_checkpoint(tmp_path):
    # Each rank has its own output dir; only rank 0's holds the run, and rank 1 gets it from there.
    def own_dir(rank):
        return [f"runtime.output_dir={tmp_path / f'disk{rank}'}"]

    extra = ["data.train_limit=256", "train.batch_size=32"]
    _finish(_launch(tmp_path, "r", [*extra, "run.epochs=1"], 2, _free_port(), per_rank=own_dir))
    assert not (tmp_path / "disk1" / "r" / "checkpoint.pt").exists()
    _finish(
        _launch(
            tmp_path,
            "r",
            [*extra, "run.epochs=2"],
            2,
            _free_port(),
            flags=["--resume"],
            per_rank=own_dir,
        )
    )
    _finish(_launch(tmp_path, "straight", [*extra, "run.epochs=2"], 2, _free_port()))
    resumed = read_jsonl(tmp_path / "disk0" / "r" / "metrics.jsonl")
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    for a, b in zip(resumed, straight, strict=True):
        for key in ("train_loss", "test_loss", "test_acc", "step"):
            assert a[key] == b[key], key


def test_batchnorm_statistics_are_averaged_before_evaluation(tmp_path):
    # Each rank normalizes with running statistics of its own shards; the sharded evaluation and
    # the checkpoint use their mean, so the checkpoint evaluated in one process gives the same loss.
    from bigbatch.analysis.landscape import evaluate_loss
    from bigbatch.analysis.loading import load_trained_run

    extra = [
        'model.name="resnet20"',
        "data.train_limit=128",
        "data.test_limit=64",
        "train.batch_size=32",
        "run.epochs=1",
        "runtime.eval_batch_size=64",
    ]
    _finish(_launch(tmp_path, "bn", extra, 2, _free_port()))
    run = load_trained_run(tmp_path / "bn")
    loss, _ = evaluate_loss(run.model, run.batches("test", batch_size=64))
    logged = read_jsonl(tmp_path / "bn" / "metrics.jsonl")[-1]["test_loss"]
    assert loss == pytest.approx(logged, rel=1e-5)
