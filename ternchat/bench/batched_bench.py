"""`ternchat bench batched`: completions per second when a batch of prompts is decoded together
(`eval/engine.generate_batch`) against one completion at a time (`generate`), in the same run.

The model is bench/decode_bench.py's random ~125M shape (12 x 768, vocabulary 32768) in inference form
with the int8 kernel (or the shape given). Each completion decodes `tokens` tokens greedily after its
own prompt (16 to 31 tokens, so the rows have different lengths and the batch is left-padded); the
one-at-a-time baseline decodes the same prompts in turn. Completions/s = completions / wall seconds,
prompts included; the first batch of each size is a warm-up.
"""

from __future__ import annotations

import os
import time

import torch

from ternchat.bench.decode_bench import SHAPES, random_model
from ternchat.train.report import machine

BATCHES = (1, 8, 32)
SHAPE = "~125M, llama.cpp knobs (12 x 768)"


def bench_batched(tokens: int = 64, batches: tuple[int, ...] = BATCHES, shape: str = SHAPE, log=print) -> dict:
    from ternchat.eval.engine import generate, generate_batch
    from ternchat.model.bitlinear import set_kernel

    torch.set_num_threads(os.cpu_count() or 1)
    model = random_model(SHAPES[shape], "ternary")
    set_kernel(model, "int8")
    prompts = [list(range(10, 26 + i % 16)) for i in range(max(batches))]

    def one_at_a_time(n: int) -> float:
        start = time.perf_counter()
        for p in prompts[:n]:
            list(generate(model, p, tokens, temperature=0))
        return time.perf_counter() - start

    def together(n: int) -> float:
        start = time.perf_counter()
        generate_batch(model, prompts[:n], tokens, temperature=0)
        return time.perf_counter() - start

    together(min(batches))  # warm-up
    base_n = min(8, max(batches))
    base_s = one_at_a_time(base_n)
    baseline = base_n / base_s
    log(f"one at a time: {baseline:.2f} completions/s ({base_n} completions in {base_s:.1f} s)")
    rows = []
    for n in batches:
        seconds = together(n)
        rows.append({"batch": n, "seconds": seconds, "completions_s": n / seconds,
                     "vs_one_at_a_time": n / seconds / baseline})
        log(f"batch {n}: {n / seconds:.2f} completions/s ({n / seconds / baseline:.1f}x)")
    return {"machine": machine(), "shape": shape, "tokens": tokens, "device": "cpu",
            "one_at_a_time": {"completions": base_n, "seconds": base_s, "completions_s": baseline}, "rows": rows}


def format_batched(r: dict) -> str:
    lines = [f"Machine: {r['machine']}. Model: {r['shape']}, random ternary weights, int8 kernel; {r['tokens']} "
             "tokens per completion, greedy.", "",
             "| decoding | completions/s | vs one at a time |", "|---|---|---|",
             f"| one at a time ({r['one_at_a_time']['completions']} completions) | "
             f"{r['one_at_a_time']['completions_s']:.2f} | 1.0x |"]
    lines += [f"| batch {row['batch']} | {row['completions_s']:.2f} | {row['vs_one_at_a_time']:.1f}x |"
              for row in r["rows"]]
    return "\n".join(lines)
