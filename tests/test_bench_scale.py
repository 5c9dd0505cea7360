"""`ternchat bench scale` on the CPU (`--cpu`): the trainer's model, recompute, offload and optimizer
run end to end on random tokens; without a GPU and without --cpu it refuses with a clear message."""

import json
import os
import subprocess
import sys

import pytest
import torch

TINY = ["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64", "tokenizer.vocab_size=512",
        "train.batch_size=2", "train.grad_accum=2", "train.compile=false", "train.activation_checkpointing=full",
        "dist.fsdp_param_dtype=fp32"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ternchat", "bench", "scale", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("losses: "))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu_unless_asked_for_the_cpu():
    result = bench("--steps", "1")
    assert result.returncode != 0 and "no CUDA device here; --cpu runs it on the CPU" in result.stderr


def test_offloaded_run_reports_the_losses_of_the_plain_one(tmp_path):
    sets = [a for o in TINY for a in ("--set", o)]
    plain = bench("--cpu", "--steps", "2", "--warmup", "1", *sets)
    offload = bench("--cpu", "--steps", "2", "--warmup", "1", *sets, "--set", "dist.strategy=fsdp2",
                    "--set", "dist.offload=true", "--out", str(tmp_path / "scale.json"))
    assert plain.returncode == 0 and offload.returncode == 0, plain.stderr + offload.stderr
    assert "tok/s" in plain.stdout and "strategy fsdp2, offload" in offload.stdout
    assert losses(plain.stdout) == losses(offload.stdout)
    assert (tmp_path / "scale.json").exists()


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_compiled_offloaded_run_with_recompute_matches_eager(tmp_path, recompute):
    # The presets compile an FSDP2 model whose blocks recompute; torch.compile once failed on the
    # checkpoint's explicit default context_fn ("checkpoint not implemented for ... context_fn").
    sets = [a for o in TINY for a in ("--set", o)] + ["--set", f"train.activation_checkpointing={recompute}",
                                                      "--set", "dist.strategy=fsdp2", "--set", "dist.offload=true"]
    eager = bench("--cpu", "--steps", "1", "--warmup", "1", *sets)
    compiled = bench("--cpu", "--steps", "1", "--warmup", "1", *sets, "--set", "train.compile=true",
                     "--profile", str(tmp_path / "profile.txt"))
    assert eager.returncode == 0 and compiled.returncode == 0, eager.stderr[-3000:] + compiled.stderr[-3000:]
    assert "compile True (model; the first step took" in compiled.stdout
    assert "the first step took" not in eager.stdout
    values = [[float(x) for x in losses(r.stdout).removeprefix("losses: ").split(", ")] for r in (eager, compiled)]
    assert values[0] == pytest.approx(values[1], rel=2e-3)
    assert "FSDP::" in (tmp_path / "profile.txt").read_text()  # the profiled step's FSDP2 phases


def test_a_run_under_the_fp8_recipe_reports_its_size_rule(tmp_path):
    sets = [a for o in TINY for a in ("--set", o)]
    result = bench("--cpu", "--steps", "1", "--warmup", "1", *sets, "--set", "fp4.recipe=fp8",
                   "--set", "fp4.fp8_min_macs=100000", "--out", str(tmp_path / "scale.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    rule = "fp8 size rule (set by fp4.fp8_min_macs): FP8 for GEMMs of at least 100,000 multiply-adds"
    assert result.stdout.count(rule) == 2  # at start, and in the table


def test_runs_compare_against_the_first_in_one_table(tmp_path):
    from ternchat.bench.scale_bench import compare_scale_runs

    sets = [a for o in TINY for a in ("--set", o)]
    for name, extra in (("dense", ["--set", "model.quant=none"]), ("fp8", ["--set", "fp4.recipe=fp8"])):
        result = bench("--cpu", "--steps", "1", "--warmup", "1", *sets, *extra, "--out", str(tmp_path / f"{name}.json"))
        assert result.returncode == 0, result.stderr[-3000:]
    table = compare_scale_runs([tmp_path / "dense.json", tmp_path / "fp8.json"]).splitlines()
    dense, fp8 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dense", "fp8"))
    assert table[4].startswith(f"| dense | {dense['tok_s']:,.0f} | 1.00x | - | eager |")
    assert table[5].startswith(f"| fp8 | {fp8['tok_s']:,.0f} | {fp8['tok_s'] / dense['tok_s']:.2f}x |")
    assert table[5].endswith("| (FP8 emulated here, so every GEMM): every GEMM in FP8 |")
