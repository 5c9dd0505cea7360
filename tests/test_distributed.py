"""torchrun with 2 gloo ranks against 1 process on the same global batch: DDP and FSDP2 give the same
gradients and parameters; Muon's whole matrices per owner rank give the single-process result; a
2-rank run killed with kill -9 resumes at 2 ranks with the same losses, and at 1 rank."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

from ternchat.train.checkpoint import latest_checkpoint
from ternchat.optim.distributed import balanced_owners

WORKER = Path(__file__).parent / "dist_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def torchrun(nproc: int, *args: str, launch: Sequence[str] = ("--standalone",), **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc-per-node={nproc}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, timeout: float) -> None:
    """One job of two "nodes" of one rank each, as on a cluster: two torchrun agents that meet through the
    c10d rendezvous (here on loopback) and are told nothing but the endpoint and the job's id."""
    launch = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
              f"--rdzv-id=job{free_port()}", "--local-addr=127.0.0.1")
    nodes = [torchrun(1, *args, launch=launch) for _ in range(2)]
    for node in nodes:
        finish(node, timeout)


def finish(job: subprocess.Popen, timeout: float) -> str:
    """Wait for a torchrun job and assert it succeeded; a job still running at `timeout` (a hang at exit,
    say) is killed with its ranks and fails the test."""
    try:
        _, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail(f"the torchrun job ran past {timeout} s: {job.args}")
    assert job.returncode == 0, err
    return err


def run_worker(tmp_path: Path, nproc: int, *args: str) -> dict:
    if nproc == 1:
        return one_process(*args)
    out = tmp_path / f"{nproc}-{'-'.join(args)}.pt"
    finish(torchrun(nproc, str(WORKER), *args, "--out", str(out)), timeout=120)
    return torch.load(out, weights_only=True)


@functools.cache
def one_process(*args: str) -> dict:
    """The worker's run in one plain process; several tests compare their ranks against the same one."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "one.pt"
        cmd = [sys.executable, str(WORKER), *args, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return torch.load(out, weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process_with_sgd(tmp_path, strategy):
    one = run_worker(tmp_path, 1, "--optim", "sgd")  # all 4 rows in one batch
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", "sgd")
    assert max_difference(one["grads"], two["grads"]) < 1e-6  # averaged, not summed: a factor 2 would show
    assert max_difference(one["params"], two["params"]) < 1e-6


@pytest.mark.parametrize("strategy, mtp", [("ddp", "heads"), ("ddp", "modules"), ("fsdp2", "modules")])
def test_multi_token_prediction_under_two_ranks_matches_one_process(tmp_path, strategy, mtp):
    # The heads' gradients reach the parameters in SequentialHeadLoss's backward, where DDP's hooks see them.
    one = run_worker(tmp_path, 1, "--optim", "sgd", "--mtp", mtp)
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", "sgd", "--mtp", mtp)
    assert any(k.startswith("mtp.") for k in two["grads"])
    assert max_difference(one["grads"], two["grads"]) < 1e-6
    assert max_difference(one["params"], two["params"]) < 1e-6


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_mhc_and_the_loop_under_two_ranks_match_one_process(tmp_path, strategy):
    # The loop runs every block twice per forward: each parameter's gradient is reduced once, whole.
    one = run_worker(tmp_path, 1, "--optim", "sgd", "--arch", "mhc-loop")
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", "sgd", "--arch", "mhc-loop")
    assert {"blocks.0.attn_residual.phi", "loop.gate.weight"} <= set(two["grads"])
    assert max_difference(one["grads"], two["grads"]) < 1e-6
    assert max_difference(one["params"], two["params"]) < 1e-6


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_fp8_gemms_and_collider_under_two_ranks_match_one_process(tmp_path, strategy):
    # Tensorwise FP8 scales and Collider's top tokens are per micro-batch: one process with two micro-batches
    # sees exactly what each rank sees.
    one = run_worker(tmp_path, 1, "--optim", "sgd", "--arch", "gemm-hooks", "--micro-batches", "2")
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", "sgd", "--arch", "gemm-hooks")
    assert max_difference(one["grads"], two["grads"]) < 1e-6
    assert max_difference(one["params"], two["params"]) < 1e-6


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_the_exact_int8_forward_under_two_ranks_matches_one_process(tmp_path, strategy):
    # Activation scales are per row and beta per whole weight (FSDP2 gathers it before the forward): a rank
    # computes exactly the integer products one process computes for its rows.
    one = run_worker(tmp_path, 1, "--optim", "sgd", "--arch", "int8")
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", "sgd", "--arch", "int8")
    assert max_difference(one["grads"], two["grads"]) < 1e-6
    assert max_difference(one["params"], two["params"]) < 1e-6
    plain = run_worker(tmp_path, 1, "--optim", "sgd")
    assert max_difference(one["grads"], plain["grads"]) > 0  # the integer product ran


@pytest.mark.parametrize("strategy, optim", [("ddp", "muon"), ("fsdp2", "muon"), ("fsdp2", "8bit-muon"),
                                             ("fsdp2", "gum")])
def test_two_ranks_match_one_process_with_matrix_optimizers(tmp_path, strategy, optim):
    # One process accumulates the two ranks' rows as two micro-batches, so the gradients agree bit for bit
    # and any difference after three steps is the distributed optimizer's (Newton-Schulz in bf16 and
    # Adam on near-zero gradients would amplify rounding-level differences far beyond 1e-6).
    one = run_worker(tmp_path, 1, "--optim", optim, "--micro-batches", "2")
    two = run_worker(tmp_path, 2, "--strategy", strategy, "--optim", optim)
    assert max_difference(one["grads"], two["grads"]) == 0
    assert max_difference(one["params"], two["params"]) < 1e-6


def test_owners_balance_the_work():
    owners = balanced_owners([100, 100, 50, 50, 10, 10], 2)
    load = [sum(s for s, o in zip([100, 100, 50, 50, 10, 10], owners) if o == r) for r in range(2)]
    assert load == [160, 160]


def tiny_train_args(overrides: list[str], run_dir: Path, *extra: str) -> list[str]:
    sets = [a for o in [*overrides, "train.max_steps=14", "train.checkpoint_every=4", "train.batch_size=4",
                        "dist.strategy=fsdp2", "dist.fsdp_param_dtype=fp32"] for a in ("--set", o)]
    return ["-m", "ternchat", "train", "--run-dir", str(run_dir), *sets, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_kill_9_of_a_two_rank_run_resumes_at_two_ranks_and_at_one(tmp_path, overrides):
    finish(torchrun(2, *tiny_train_args(overrides, tmp_path / "ref")), timeout=300)

    victim = torchrun(2, *tiny_train_args(overrides, tmp_path / "cut"))
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_000008" / "checksums.json").exists():
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[1]
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole job: torchrun and both ranks
    victim.wait()
    assert latest_checkpoint(tmp_path / "cut").name in ("step_000008", "step_000012")
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_one_rank")

    finish(torchrun(2, *tiny_train_args(overrides, tmp_path / "cut", "--resume")), timeout=300)
    expected, got = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 15))
    assert got == expected  # bit-identical on CPU

    # The same checkpoint at one rank: the same global batch now runs as 4 rows on one process.
    one = subprocess.run([sys.executable, *tiny_train_args(overrides, tmp_path / "cut_one_rank", "--resume",
                                                           "--set", "train.batch_size=8")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    resumed_alone = losses(tmp_path / "cut_one_rank")
    assert sorted(resumed_alone) == list(range(1, 15))
    first_after = min(s for s in resumed_alone if s > 8)
    assert resumed_alone[first_after] == pytest.approx(expected[first_after], rel=1e-4)


def test_two_nodes_train_checkpoint_and_resume_like_one_node_with_two_ranks(tmp_path, overrides):
    steps = ["--set", "train.max_steps=8"]
    finish(torchrun(2, *tiny_train_args(overrides, tmp_path / "one_node", *steps)), timeout=300)
    two_nodes(*tiny_train_args(overrides, tmp_path / "two_nodes", *steps), timeout=300)
    expected = losses(tmp_path / "one_node")
    assert sorted(expected) == list(range(1, 9))
    assert losses(tmp_path / "two_nodes") == expected  # the same ranks and rows: bit-identical on CPU
    shutil.rmtree(tmp_path / "two_nodes" / "checkpoints" / "step_000008")
    two_nodes(*tiny_train_args(overrides, tmp_path / "two_nodes", *steps, "--resume"), timeout=300)
    assert latest_checkpoint(tmp_path / "two_nodes").name == "step_000008"
    assert losses(tmp_path / "two_nodes") == expected


def test_document_loader_positions_resume_per_rank(tmp_path, overrides):
    """FIM documents under 2 DDP ranks: each rank's loader position (documents in preparation, tokens
    waiting) is saved, and a resumed run repeats the uninterrupted one's losses; 1 rank is refused."""
    loader = ["--set", "loader.fim_rate=0.5", "--set", "dist.strategy=ddp", "--set", "train.max_steps=8"]
    finish(torchrun(2, *tiny_train_args(overrides, tmp_path / "ref", *loader)), timeout=300)
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000008")
    finish(torchrun(2, *tiny_train_args(overrides, tmp_path / "cut", "--resume", *loader)), timeout=300)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    alone = subprocess.run([sys.executable, *tiny_train_args(overrides, tmp_path / "cut", "--resume", *loader,
                                                             "--set", "train.max_steps=12")],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert alone.returncode != 0 and "resume it on as many" in alone.stderr


@pytest.mark.parametrize("optim", ["muon", "gum"])
def test_offload_matches_the_run_without_it(tmp_path, optim):
    # One process; the shards and the optimizer state stay in host memory and each matrix steps on the
    # compute device (here both are the CPU, so this checks the code path and its arithmetic).
    plain = run_worker(tmp_path, 1, "--optim", optim)
    offloaded = run_worker(tmp_path, 1, "--strategy", "fsdp2", "--offload", "--optim", optim)
    assert max_difference(plain["grads"], offloaded["grads"]) == 0
    assert max_difference(plain["params"], offloaded["params"]) == 0


def test_offload_sums_micro_batches_like_one_process(tmp_path):
    # Offload keeps the micro-batches' gradient sum off the parameters between backwards (HostGradientSum).
    plain = run_worker(tmp_path, 1, "--optim", "muon", "--micro-batches", "3")
    offloaded = run_worker(tmp_path, 1, "--strategy", "fsdp2", "--offload", "--optim", "muon", "--micro-batches", "3")
    assert max_difference(plain["grads"], offloaded["grads"]) == 0
    assert max_difference(plain["params"], offloaded["params"]) == 0


def test_offload_with_two_ranks_matches_one_process(tmp_path):
    one = run_worker(tmp_path, 1, "--optim", "8bit-muon", "--micro-batches", "2")
    two = run_worker(tmp_path, 2, "--strategy", "fsdp2", "--offload", "--optim", "8bit-muon")
    assert max_difference(one["grads"], two["grads"]) == 0
    assert max_difference(one["params"], two["params"]) < 1e-6


def test_offloaded_training_has_the_losses_of_plain_training_and_resumes(tmp_path, overrides):
    def train(run_dir: Path, *extra: str) -> dict[int, float]:
        sets = [a for o in [*overrides, "train.max_steps=6", "train.checkpoint_every=3", "train.batch_size=4",
                            *extra] for a in ("--set", o)]
        args = ["--resume"] if (run_dir / "checkpoints").exists() else []
        proc = subprocess.run([sys.executable, "-m", "ternchat", "train", "--run-dir", str(run_dir), *sets, *args],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return losses(run_dir)

    offload = ("dist.strategy=fsdp2", "dist.offload=true", "dist.fsdp_param_dtype=fp32")
    plain = train(tmp_path / "plain")
    offloaded = train(tmp_path / "offload", *offload)
    assert sorted(offloaded) == list(range(1, 7))
    assert offloaded == pytest.approx(plain, rel=1e-6)

    shutil.rmtree(tmp_path / "offload" / "checkpoints" / "step_000006")
    assert train(tmp_path / "offload", *offload) == offloaded
