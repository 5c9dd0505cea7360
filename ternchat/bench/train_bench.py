"""`ternchat bench train`: training throughput and memory of ternchat against plain baselines.

Variants, all at the same model shape, batch and real token batches:
  a  dense fp32 model, torch.optim.AdamW, eager (a plain nanoGPT-style baseline)
  b  the same dense model, bf16 autocast and torch.compile, AdamW
  c  ternchat's ternary model with Muon (+ AdamW for embedding, head, gains), bf16 autocast,
     eager (c_eager) and compiled (c_compiled)
  b_muon  (b) with ternchat's Muon: separates the optimizer's cost (b -> b_muon) from the
     ternary quantization's (b_muon -> c_compiled)
  c_int8  (c_compiled) with the exact int8 forward (`model.ternary_gemm = "int8"`, torch._int_mm): whether
     this machine's integer GEMM beats its float one at the model's shapes (AVX512-VNNI or AMX on a CPU)
Throughput is measured in one process, the variants taking turns round by round, so they share
the machine's state; the reported tok/s is each variant's total tokens over its total time.
Peak memory is measured per variant: CUDA peak allocation in the same process, or on CPU the
peak RSS of a separate process that runs only that variant (RSS cannot be split inside one).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ternchat.config import Config
from ternchat.data.loader import TokenLoader
from ternchat.data.pipeline import prepare_data
from ternchat.data.shards import shard_paths
from ternchat.model.bitlinear import set_training_gemm
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.factory import build_optimizer
from ternchat.train.report import machine
from ternchat.train.step import autocast_for
from ternchat.train.trainer import peak_memory_bytes, pick_device

VARIANTS = {
    "a": "dense fp32, AdamW, eager",
    "b": "dense bf16 autocast, AdamW, compiled",
    "b_muon": "dense bf16 autocast, Muon, compiled",
    "c_eager": "ternary, Muon, bf16 autocast, eager",
    "c_compiled": "ternary, Muon, bf16 autocast, compiled",
    "c_int8": "ternary, Muon, bf16 autocast, compiled, exact int8 forward",
}


@dataclass
class Variant:
    name: str
    model: GPT
    step_fn: object
    optimizer: object
    autocast: contextlib.AbstractContextManager
    seconds: float = 0.0
    tokens: int = 0


def build_variant(name: str, cfg: Config, vocab_size: int, device: torch.device) -> Variant:
    quant = "ternary" if name.startswith("c") else "none"
    muon = name.startswith("c") or name == "b_muon"
    shape = GPTShape.from_config(cfg, vocab_size)
    torch.manual_seed(0)
    model = set_training_gemm(GPT(GPTShape(**{**shape.__dict__, "quant": quant})).to(device),
                              "int8" if name == "c_int8" else "float")
    if muon:
        optimizer = build_optimizer(model, cfg.optim)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr_embed, betas=(cfg.optim.beta1, cfg.optim.beta2))
    forward = torch.compile(model) if name in ("b", "b_muon", "c_compiled", "c_int8") else model
    autocast = contextlib.nullcontext() if name == "a" else autocast_for("bf16", device)
    return Variant(name, model, forward, optimizer, autocast)


def run_steps(v: Variant, loader: TokenLoader, steps: int) -> None:
    for _ in range(steps):
        x, y = loader.next_batch()
        with v.autocast:
            loss = v.step_fn(x, y)
        loss.backward()
        v.optimizer.step()
        v.optimizer.zero_grad()
    if x.is_cuda:
        torch.cuda.synchronize()


def _loader(cfg: Config, shard_dir, tok_hash: str, device: torch.device) -> TokenLoader:
    return TokenLoader(shard_paths(shard_dir, "train"), cfg.train.batch_size, cfg.model.seq_len, seed=0,
                       tokenizer_hash=tok_hash, device=device, verify=False)


def memory_probe(cfg: Config, name: str, steps: int) -> int:
    """Peak memory of `steps` training steps of one variant in this process."""
    device = pick_device()
    data = prepare_data(cfg, log=lambda _: None)
    loader = _loader(cfg, data.shard_dir, data.tokenizer.hash, device)
    variant = build_variant(name, cfg, data.tokenizer.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_steps(variant, loader, steps)
    return peak_memory_bytes(device)


def bench_train(cfg: Config, config_path: str | None, overrides: list[str], rounds: int, steps: int,
                warmup: int, log=print) -> dict:
    device = pick_device()
    data = prepare_data(cfg, log=log)
    loader = _loader(cfg, data.shard_dir, data.tokenizer.hash, device)
    variants = [build_variant(name, cfg, data.tokenizer.vocab_size, device) for name in VARIANTS]
    for v in variants:
        log(f"warm-up (and compilation) of {v.name}: {VARIANTS[v.name]}")
        run_steps(v, loader, warmup)
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    for r in range(rounds):
        for v in variants:
            start = time.perf_counter()
            run_steps(v, loader, steps)
            v.seconds += time.perf_counter() - start
            v.tokens += steps * tokens_per_step
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{v.name} {v.tokens / v.seconds:,.0f} tok/s" for v in variants))
    memory = {}
    for v in variants:
        if device.type == "cuda":
            del v.step_fn
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            memory[v.name] = memory_probe(cfg, v.name, warmup)
        else:
            args = [sys.executable, "-m", "ternchat.bench.train_bench", "--probe", v.name, "--steps", str(warmup)]
            args += (["--config", config_path] if config_path else []) + [a for o in overrides for a in ("--set", o)]
            out = subprocess.run(args, capture_output=True, text=True, check=True)
            memory[v.name] = int(out.stdout.strip().splitlines()[-1])
    tok_s = {v.name: v.tokens / v.seconds for v in variants}
    return {"machine": machine(), "device": str(device), "shape": {"batch": cfg.train.batch_size,
            "seq_len": cfg.model.seq_len, "depth": cfg.model.depth, "d_model": cfg.model.d_model,
            "vocab": data.tokenizer.vocab_size}, "rounds": rounds, "steps_per_round": steps,
            "tok_s": tok_s, "peak_memory_bytes": memory,
            "memory_method": "CUDA peak allocated" if device.type == "cuda" else "peak RSS of a separate process"}


def format_table(result: dict) -> str:
    tok_s, mem = result["tok_s"], result["peak_memory_bytes"]
    lines = [f"Machine: {result['machine']}; device {result['device']}; shape {result['shape']}; "
             f"{result['rounds']} rounds x {result['steps_per_round']} steps per variant; memory: "
             f"{result['memory_method']}.", "",
             "| variant | tok/s | vs (a) | vs (b) | vs (c_compiled) | peak memory |", "|---|---|---|---|---|---|"]
    for name, label in VARIANTS.items():
        lines.append(f"| ({name}) {label} | {tok_s[name]:,.0f} | {tok_s[name] / tok_s['a']:.2f}x | "
                     f"{tok_s[name] / tok_s['b']:.2f}x | {tok_s[name] / tok_s['c_compiled']:.2f}x | "
                     f"{mem[name] / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def _probe_main() -> None:
    from ternchat.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True, choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    print(memory_probe(load_config(args.config, args.overrides), args.probe, args.steps))


if __name__ == "__main__":
    _probe_main()
