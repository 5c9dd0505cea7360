"""`ternchat bench scale`: a config's real model trained for a few steps, against its plan.

The model, recompute, sharding or offload and optimizer are the ones `ternchat train` builds for
the config (`trainer.build_training`); the batches are random tokens, so no corpus has to be
built for a 5B-parameter run. With `--memory-cap` the process may allocate only that much of the
GPU (`torch.cuda.set_per_process_memory_fraction`), so a larger GPU stands in for the target card.
It reports, after untimed warm-up steps (compilation, the optimizer state's creation):
- tokens/s over the timed steps (every rank's tokens, synchronized at each step's end), and the share
  of a step spent in `optimizer.step` (the rest: the micro-batches' forwards and backwards, clipping);
- the model FLOP rate 6 x parameters x tokens/s (forward and backward of every weight, attention's
  own FLOPs left out) and its share of the card's dense bf16 peak (MFU);
- the CUDA allocator's peak (`torch.cuda.max_memory_allocated`) against the plan's peak without the
  CUDA context and allocator slack, which the allocator's figure does not contain.
Under torchrun every rank trains its share and rank 0 reports. On a CPU (`--cpu`) it runs as a
check of the code path; its figures then say nothing about a GPU. `--profile FILE` writes the last
step's torch.profiler tables (operators and FSDP2's phases by CPU and GPU time) to FILE.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ternchat.config import Config
from ternchat.model.gpt import GPTShape
from ternchat.plan import plan_memory
from ternchat.train.distributed import Ranks, init_distributed, launched_ranks, shutdown_distributed
from ternchat.train.errors import RunError
from ternchat.train.report import bf16_peak_tflops, machine
from ternchat.train.step import autocast_for, compute_dtype, optimizer_step
from ternchat.train.trainer import build_training, peak_memory_bytes, training_forward

def bench_scale(cfg: Config, steps: int, warmup: int, memory_cap: int | None = None,
                peak_tflops: float | None = None, allow_cpu: bool = False, profile: Path | None = None) -> dict:
    ranks = launched_ranks()
    device = init_distributed(cfg.dist, ranks)
    try:
        result = _measure(cfg, steps, warmup, ranks, device, memory_cap, peak_tflops, allow_cpu, profile)
    finally:
        shutdown_distributed()  # after _measure's model is gone: it holds the process group
    return result if ranks.main else {}


def _measure(cfg: Config, steps: int, warmup: int, ranks: Ranks, device: torch.device, memory_cap: int | None,
             peak_tflops: float | None, allow_cpu: bool, profile: Path | None) -> dict:
    if device.type != "cuda" and not allow_cpu:
        raise RunError("bench scale measures a GPU and there is no CUDA device here; --cpu runs it on the CPU "
                       "to check the code path")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    if memory_cap is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if memory_cap > total:
            raise RunError(f"--memory-cap {memory_cap / 2**30:.1f} GiB is more than this GPU's "
                           f"{total / 2**30:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(memory_cap / total, device)
    t = cfg.train
    shape = GPTShape.from_config(cfg, cfg.tokenizer.vocab_size)
    model, parallel_model, optimizer = build_training(cfg, shape, ranks, device)
    autocast = autocast_for(t.dtype, device)
    notes = model.fit_gemms(device, t.batch_size * shape.seq_len, compute_dtype(autocast))
    if ranks.main and notes:
        print("\n".join(notes))
    forward = training_forward(cfg, parallel_model, device, print)
    generator = torch.Generator().manual_seed(t.seed + ranks.rank)
    batches = [torch.randint(0, shape.vocab_size, (t.batch_size, shape.seq_len + 1), generator=generator)
               for _ in range(t.grad_accum)]
    batches = [b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else b for b in batches]
    optimizer.set_schedule(1.0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    update_seconds: list[float] = []  # optimizer.step alone, to split a step's time
    step_updates = optimizer.step

    def timed_update() -> None:
        sync()
        start = time.perf_counter()
        step_updates()
        sync()
        update_seconds.append(time.perf_counter() - start)

    optimizer.step = timed_update
    seconds, losses = [], []
    first_step_seconds = 0.0
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiling = profile is not None and ranks.main and step == warmup + steps - 1
        profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                           + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                    if profiling else contextlib.nullcontext())
        sync()
        start = time.perf_counter()
        with profiler:
            losses.append(optimizer_step(forward, model, optimizer, ((b[:, :-1], b[:, 1:]) for b in batches),
                                         t.grad_accum, autocast, cfg.optim.grad_clip, device))
            sync()
        if profiling:
            write_profile(profiler, profile)
        if step == 0:
            first_step_seconds = time.perf_counter() - start
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
        if ranks.main:
            print(f"step {step + 1}/{warmup + steps}{' (warm-up)' if step < warmup else ''}: loss {losses[-1]:.4f}, "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
    params = model.parameter_counts()["total"]
    tokens_per_step = t.batch_size * t.grad_accum * shape.seq_len * ranks.world_size
    tok_s = tokens_per_step * len(seconds) / sum(seconds)
    plan = plan_memory(cfg, shape.vocab_size, t.batch_size, gpus=ranks.world_size, device=device.type)
    planned_tensors = plan.total - sum(plan.components.get(k, 0.0) for k in ("CUDA context", "allocator slack (5%)"))
    peak = peak_tflops or (bf16_peak_tflops(name) if device.type == "cuda" else None)
    result = {"device": name, "cuda": device.type == "cuda", "world_size": ranks.world_size, "parameters": params,
              "steps": steps, "warmup": warmup, "tokens_per_step": tokens_per_step, "seconds_per_step": sum(seconds) / len(seconds),
              "update_seconds_per_step": sum(update_seconds[warmup:]) / max(1, len(update_seconds[warmup:])),
              "tok_s": tok_s, "model_tflops": 6 * params * tok_s / 1e12, "peak_tflops": peak,
              "mfu": 6 * params * tok_s / (peak * 1e12 * ranks.world_size) if peak else None,
              "losses": losses, "peak_memory_bytes": peak_memory_bytes(device), "memory_cap_bytes": memory_cap,
              "planned_tensor_bytes": planned_tensors, "planned_bytes": plan.total,
              "activation_checkpointing": t.activation_checkpointing, "strategy": cfg.dist.strategy,
              "offload": cfg.dist.offload, "compile": t.compile,
              "compile_scope": cfg.compile_scope() if t.compile else None,
              # the first step traces and compiles the model (and autotunes): what it took beyond a measured step
              "compile_seconds": first_step_seconds - sum(seconds) / len(seconds) if t.compile else None,
              "gemm_notes": notes}
    return result


def write_profile(profiler: torch.profiler.profile, path: Path) -> None:
    """The profiled step's operators and FSDP2's annotated phases, by total time, as a text table."""
    averages = profiler.key_averages()
    tables = [f"sorted by {key}:\n" + averages.table(sort_by=key, row_limit=40)
              for key in ("cpu_time_total", "self_cpu_time_total", "device_time_total")]
    path.write_text("\n\n".join(tables))
    print(f"profile of the last step: {path}")


def format_scale(r: dict) -> str:
    gib = 2 ** 30
    cap = f", memory capped at {r['memory_cap_bytes'] / gib:.1f} GiB" if r["memory_cap_bytes"] else ""
    mfu = (f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:,.0f} TFLOP/s dense bf16 per device" if r["mfu"] is not None
           else "MFU: no peak known for this device (pass --peak-tflops)")
    peak, planned = r["peak_memory_bytes"], r["planned_tensor_bytes"]
    if r["cuda"]:
        memory = (f"peak memory {peak / gib:,.2f} GiB against the plan's {planned / gib:,.2f} GiB of tensors "
                  f"({100 * (planned - peak) / peak:+.1f}%; the plan's total with CUDA context and slack: "
                  f"{r['planned_bytes'] / gib:,.2f} GiB)")
    else:
        memory = f"peak RSS {peak / gib:,.2f} GiB (a CPU process's RSS; not comparable with the plan)"
    return "\n".join([
        f"{r['device']} x {r['world_size']}{cap}: {r['parameters'] / 1e6:,.1f}M parameters, "
        f"{r['tokens_per_step']:,} tokens per step, recompute {r['activation_checkpointing']}, "
        f"strategy {r['strategy']}{', offload' if r['offload'] else ''}, compile {r['compile']}"
        + (f" ({r['compile_scope']}; the first step took {r['compile_seconds']:.1f} s more than a measured one)"
           if r.get("compile_seconds") is not None else ""),
        *r.get("gemm_notes", []),
        f"tok/s {r['tok_s']:,.0f} ({r['seconds_per_step']:.2f} s per step over {r['steps']} steps after "
        f"{r['warmup']} warm-up), of which optimizer.step {r['update_seconds_per_step']:.2f} s",
        f"model FLOP rate 6 x params x tok/s: {r['model_tflops']:,.3f} TFLOP/s; {mfu}",
        memory,
        f"losses: {', '.join(f'{x:.4f}' for x in r['losses'])}"])


def compare_scale_runs(paths: list[str | Path]) -> str:
    """One table of several `bench scale --out` results, each against the first (the baseline measured
    in the same session): tok/s and its ratio, MFU, what the first step took beyond a measured one
    (compilation), peak memory, and an FP8 recipe's size rule where there was one."""
    import json

    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    base = runs[0][1]["tok_s"]
    lines = [f"{runs[0][1]['device']}, each run against {runs[0][0]}:", "",
             "| run | tok/s | vs first | MFU | first step beyond a measured one | peak GiB | fp8 size rule |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        compiled = (f"{r['compile_seconds']:.1f} s ({r['compile_scope']})" if r.get("compile_seconds") is not None
                    else "eager")
        rule = next((note.removeprefix("fp8 size rule ") for note in r.get("gemm_notes", [])
                     if note.startswith("fp8 size rule")), "-")
        lines.append(f"| {name} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {mfu} | {compiled} | "
                     f"{r['peak_memory_bytes'] / 2 ** 30:.2f} | {rule} |")
    return "\n".join(lines)
