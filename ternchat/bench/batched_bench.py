"""`ternchat bench batched`: completions per second when a batch of prompts is decoded together
(`eval/engine.generate_batch`) against one completion at a time (`generate`), in the same run.

The model is bench/decode_bench.py's random ~125M shape (12 x 768, vocabulary 32768) in the form
`ternchat eval --run model_packed.safetensors` decodes it: TernaryLinear layers, one at a time with the
float kernel (the packed file's default), in batches with the dense kernel (`engine.for_batches`), whose
output is the same bit for bit. A second baseline decodes one at a time with the int2 kernel, the fastest
for one sequence in `bench decode` (the int8 and int2 kernels grow linearly with the rows on the CPU:
13.7 and 4.9 ms against the float kernel's 1.3 ms for one 768 x 768 layer at 32 rows on 2 EPYC cores). Each completion decodes `tokens` tokens greedily after its
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


ONE_AT_A_TIME = (("float kernel (the packed file's default)", "float", False),
                 ("int2 kernel, compiled step (bench decode's fastest)", "int2", True))


def bench_batched(tokens: int = 64, batches: tuple[int, ...] = BATCHES, shape: str = SHAPE, log=print) -> dict:
    from ternchat.eval.decode_step import CompiledStep
    from ternchat.eval.engine import for_batches, generate, generate_batch
    from ternchat.model.bitlinear import set_kernel

    torch.set_num_threads(os.cpu_count() or 1)
    model = random_model(SHAPES[shape], "ternary")
    prompts = [list(range(10, 26 + i % 16)) for i in range(max(batches))]
    base_n = min(8, max(batches))
    baselines = []
    for name, kernel, compiled in ONE_AT_A_TIME:
        set_kernel(model, kernel)
        step = CompiledStep(model) if compiled else None
        if step is not None:
            list(generate(model, prompts[0], tokens, temperature=0, compiled_step=step))  # compiles
        start = time.perf_counter()
        for p in prompts[:base_n]:
            list(generate(model, p, tokens, temperature=0, compiled_step=step))
        seconds = time.perf_counter() - start
        baselines.append({"decoding": f"one at a time, {name}", "completions": base_n, "seconds": seconds,
                          "completions_s": base_n / seconds})
        log(f"{baselines[-1]['decoding']}: {base_n / seconds:.2f} completions/s ({base_n} in {seconds:.1f} s)")

    def together(n: int) -> float:
        start = time.perf_counter()
        generate_batch(model, prompts[:n], tokens, temperature=0)
        return time.perf_counter() - start

    for_batches(model)
    together(min(batches))  # warm-up
    rows = []
    for n in batches:
        seconds = together(n)
        rows.append({"decoding": f"batch {n}, dense kernel", "completions": n, "seconds": seconds,
                     "completions_s": n / seconds})
        log(f"{rows[-1]['decoding']}: {n / seconds:.2f} completions/s")
    return {"machine": machine(), "shape": shape, "tokens": tokens, "device": "cpu", "one_at_a_time": baselines,
            "rows": rows}


def format_batched(r: dict) -> str:
    float_base, fastest = (b["completions_s"] for b in r["one_at_a_time"])
    lines = [f"Machine: {r['machine']}. Model: {r['shape']}, random ternary weights; {r['tokens']} tokens per "
             "completion, greedy, prompts included.", "",
             "| decoding | completions/s | vs one at a time (float) | vs one at a time (fastest) |",
             "|---|---|---|---|"]
    lines += [f"| {row['decoding']} | {row['completions_s']:.2f} | {row['completions_s'] / float_base:.1f}x | "
              f"{row['completions_s'] / fastest:.1f}x |" for row in r["one_at_a_time"] + r["rows"]]
    return "\n".join(lines)
