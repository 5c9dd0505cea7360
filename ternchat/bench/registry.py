"""The benchmark table: each `ternchat bench NAME` is one row (its help and the function that runs it).

A row's `run` takes the parsed command line and returns what it measured (a dict) or None (a torchrun
rank other than 0); `table` formats that dict. Modules are imported when their row runs, so listing
the table costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

from ternchat.config import ConfigError, load_config, parse_bytes


@dataclass(frozen=True)
class Benchmark:
    help: str  # one clause: what it compares
    run: Callable[[argparse.Namespace], dict | None]
    table: str  # "module:function" that formats the result


def _config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _optim(args: argparse.Namespace) -> dict:
    from ternchat.bench.optim_bench import bench_optim

    result = bench_optim(args.config, args.overrides, args.optim_steps, args.out_dir)
    print(f"loss curves: {args.out_dir / 'optim_loss.png'}")
    return result


def _dedup(args: argparse.Namespace) -> dict:
    from ternchat.bench.dedup_bench import bench_dedup
    from ternchat.data.pipeline import prepare_data

    cfg = _config(args)
    return bench_dedup(prepare_data(cfg, until="corpus").corpus_dir, cfg.data.minhash_perms, cfg.data.near_dup_threshold)


def _sweep(args: argparse.Namespace) -> dict:
    from ternchat.bench.sweep import bench_sweep, parse_grid

    if not args.grid:
        raise ConfigError("bench sweep needs at least one --grid section.key=value1,value2,...")
    return bench_sweep(args.config, args.overrides, parse_grid(args.grid), args.optim_steps)


def _fire(args: argparse.Namespace) -> dict:
    from ternchat.bench.fire_bench import bench_fire

    if args.run is None:
        raise ConfigError("bench fire needs --run DIR (a trained run folder)")
    return bench_fire(args.run)


def _scale(args: argparse.Namespace) -> dict | None:
    from ternchat.bench.scale_bench import bench_scale

    try:
        cap = parse_bytes(args.memory_cap) if args.memory_cap else None
    except ValueError as e:
        raise ConfigError(f"--memory-cap: {e}") from None
    return bench_scale(_config(args), args.steps, args.warmup, cap, args.peak_tflops, args.cpu, args.profile) or None


def _steps(module: str, function: str) -> Callable[[argparse.Namespace], dict]:
    """A benchmark that trains a config's model for --optim-steps steps per variant."""
    def run(args: argparse.Namespace) -> dict:
        bench = getattr(importlib.import_module(f"ternchat.bench.{module}"), function)
        return bench(args.config, args.overrides, args.optim_steps)
    return run


def _train(args: argparse.Namespace) -> dict:
    from ternchat.bench.train_bench import bench_train

    return bench_train(_config(args), args.config, args.overrides, args.rounds, args.steps, args.warmup)


def _eval(args: argparse.Namespace) -> dict:
    from ternchat.bench.eval_bench import bench_eval

    return bench_eval(args.problems, args.workers, args.baseline_problems, args.allow_unisolated)


def _loader(args: argparse.Namespace) -> dict:
    from ternchat.bench.loader_bench import bench_loader

    return bench_loader(args.config, args.overrides, args.optim_steps, workers=args.workers or 1)


def _gemm(args: argparse.Namespace) -> dict:
    from ternchat.bench.gemm_bench import bench_gemm

    return bench_gemm()


def _decode(args: argparse.Namespace) -> dict:
    from ternchat.bench.decode_bench import bench_decode

    return bench_decode(args.decode_tokens)


def _mtp(args: argparse.Namespace) -> dict:
    from ternchat.bench.mtp_bench import bench_mtp

    return bench_mtp(args.config, args.overrides, args.optim_steps, args.decode_tokens)


def _batched(args: argparse.Namespace) -> dict:
    from ternchat.bench.batched_bench import bench_batched

    return bench_batched(args.decode_tokens)


BENCHMARKS: dict[str, Benchmark] = {
    "train": Benchmark("tokens/s and peak memory of a dense fp32 AdamW baseline, dense bf16 compiled and ternchat's "
                       "ternary Muon model (eager and compiled) at the config's shape", _train,
                       "train_bench:format_table"),
    "eval": Benchmark("evaluations/s of the sandboxed HumanEval-Rust harness against plain one-at-a-time rustc",
                      _eval, "eval_bench:format_result"),
    "optim": Benchmark("the memory-efficient optimizers against Muon and AdamW on the same model, seed and batches",
                       _optim, "optim_bench:format_report"),
    "sweep": Benchmark("validation loss over a grid of config values (--grid)", _sweep, "sweep:format_sweep"),
    "dedup": Benchmark("near-duplicate sketches on the corpus, rensa against datasketch (if installed)", _dedup,
                       "dedup_bench:format_dedup"),
    "dist": Benchmark("tokens/s of one process against two torchrun ranks (DDP, FSDP2) on the same global batch",
                      _steps("dist_bench", "bench_dist"), "dist_bench:format_dist"),
    "scale": Benchmark("a config's real model for a few steps on a GPU (optionally capped to a smaller card): "
                       "tok/s, MFU and peak memory against the plan", _scale, "scale_bench:format_scale"),
    "mtp": Benchmark("val bpb without MTP, with heads and with modules, and speculative against plain decoding",
                     _mtp, "mtp_bench:format_mtp"),
    "arch": Benchmark("the plain model against mHC, unconstrained HC, LoopLM (T 2, 4) and mHC with LoopLM (val bpb, "
                      "tok/s, memory, composite gain, Q-exit)", _steps("arch_bench", "bench_arch"),
                      "arch_bench:format_arch"),
    "precision": Benchmark("high-precision GEMMs against each [fp4] recipe (val bpb, loss curve, quantization "
                           "error, GPU GEMM throughput)", _steps("gemm_bench", "bench_precision"),
                           "gemm_bench:format_precision"),
    "gemm": Benchmark("bf16 against FP8 GEMM TFLOP/s on CUDA (the GPU GEMM rows alone)", _gemm,
                      "gemm_bench:format_gemm"),
    "collider": Benchmark("backward and step time and val bpb at 0/20/40/60% of tokens filtered",
                          _steps("gemm_bench", "bench_collider"), "gemm_bench:format_collider"),
    "loader": Benchmark("the share of step time spent waiting for data with 10% slow samples: in-process and "
                        "in-order loaders against MinatoLoader", _loader, "loader_bench:format_loader"),
    "fire": Benchmark("a trained run's val bpb and ternary codes before and after FIRE (exact and the official "
                      "5 Newton-Schulz steps)", _fire, "fire_bench:format_fire"),
    "decode": Benchmark("batch-1 decoding tok/s and peak memory: dense bf16, ternary float and int8 kernels, "
                        "llama.cpp TQ2_0/TQ1_0", _decode, "decode_bench:format_decode"),
    "batched": Benchmark("completions/s of batched decoding (dense kernel) at batch 1, 8 and 32 against one "
                         "completion at a time (float kernel; int2 kernel with the compiled step), the ~125M shape",
                         _batched, "batched_bench:format_batched"),
}


def format_result(name: str, result: dict) -> str:
    module, function = BENCHMARKS[name].table.split(":")
    return getattr(importlib.import_module(f"ternchat.bench.{module}"), function)(result)
