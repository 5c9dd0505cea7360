"""`ternchat bench decode`: batch-1 decoding speed and memory of a ternary model, ternchat against llama.cpp.

For each model shape: the tiny_cpu preset's (6 x 384; llama.cpp's bitnet graph does not apply to it), a
tiny llama.cpp-compatible one (6 x 256, d_ff 768, swiglu, no QK-norm, tied head) and a ~125M
llama.cpp-compatible one (12 x 768, d_ff 2048, vocabulary 32768). One randomly initialized model per shape
(decoding speed does not depend on the weights' values), decoded greedily from the same 16-token prompt:
- **dense bf16**: the same shape with dense linears, cast to bf16 (ternchat's dense baseline), eager and
  with the compiled one-token step (eval/decode_step.py);
- **ternary, float kernel (before)**: each linear dequantizes its int8 codes to floats at every call;
- **ternary, int8 kernel**: the activations' int8 values times the codes in torch._int_mm's int8 GEMM with
  int32 accumulation, scaled once (model/bitlinear.py, `TernaryLinear.kernel`);
- **ternary, int2 kernel**: the same product from codes packed 2 bits each, by ternchat's C++ kernel
  (model/csrc/ternary_mm.cpp, AVX512-VNNI where the CPU has it), eager and with the compiled step (after);
- **llama.cpp TQ2_0 and TQ1_0** (llama-cpp-python, when installed): the model's `ternchat export --format
  gguf` file.
Every variant runs in its own process. Memory: the bytes of the weights as the variant holds them (the
ternary variants keep the int8 codes beside a kernel's own layout), and the process's resident memory
while decoding, which includes the Python and PyTorch or llama.cpp runtime (the process's peak also
counts building the random model, so it is not reported). Tokens/s counts the decoded tokens after the
first, whose time includes the prompt; a compiled step is compiled during a warm-up generation first, and
that time is reported. Both engines use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ternchat.train.report import machine

SHAPES: dict[str, dict] = {
    "tiny_cpu (6 x 384)": dict(vocab_size=8192, depth=6, d_model=384, n_heads=6, d_ff=1536, seq_len=256),
    "tiny, llama.cpp knobs (6 x 256)": dict(vocab_size=8192, depth=6, d_model=256, n_heads=4, d_ff=768, seq_len=256,
                                            mlp="swiglu", qk_norm=False, tie_embeddings=True),
    "~125M, llama.cpp knobs (12 x 768)": dict(vocab_size=32768, depth=12, d_model=768, n_heads=12, d_ff=2048,
                                              seq_len=1024, mlp="swiglu", qk_norm=False, tie_embeddings=True),
}
VARIANTS = ["dense bf16", "dense bf16, compiled step", "ternary, float kernel (before)", "ternary, int8 kernel",
            "ternary, int2 kernel", "ternary, int2 kernel, compiled step (after)", "llama.cpp TQ2_0", "llama.cpp TQ1_0"]
PROMPT_TOKENS = 16


def random_model(shape: dict, quant: str, seed: int = 0):
    """A model of `shape` whose every linear is random (the output projections too, which training starts at 0)."""
    from ternchat.model.bitlinear import to_inference
    from ternchat.model.gpt import GPT, GPTShape

    torch.manual_seed(seed)
    model = GPT(GPTShape(**shape, quant=quant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "embed.weight":
                p.normal_(0, p.shape[1] ** -0.5)
    return (to_inference(model) if quant == "ternary" else model).eval()


def _decode_ternchat(shape: dict, variant: str, tokens: int) -> dict:
    from ternchat.eval.engine import generate
    from ternchat.model.bitlinear import set_kernel

    from ternchat.eval.decode_step import CompiledStep

    dense = variant.startswith("dense")
    model = random_model(shape, "none" if dense else "ternary")
    if dense:
        model = model.to(torch.bfloat16)
    else:
        set_kernel(model, next(k for k in ("int8", "int2", "float") if k in variant))
    weights = [*model.parameters(), *model.buffers()]
    weights += [t for m in model.modules() for t in (getattr(m, "_packed", None), getattr(m, "_codes_by_column", None))
                if t is not None]
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    step = CompiledStep(model) if "compiled" in variant else None
    prompt = list(range(10, 10 + PROMPT_TOKENS))
    rss = []

    def timed() -> tuple[float, int]:
        stamps = []
        for _ in generate(model, prompt, tokens, temperature=0, compiled_step=step):
            stamps.append(time.perf_counter())
        rss.append(_resident_bytes())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

    start = time.perf_counter()
    timed()  # warm-up (and compilation)
    warmup_s = time.perf_counter() - start
    tok_s, count = timed()
    return {"tok_s": tok_s, "tokens": count, "weight_bytes": weight_bytes, "rss_bytes": rss[-1],
            "warmup_s": warmup_s}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _decode_llama_cpp(shape: dict, variant: str, tokens: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from ternchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer
    from ternchat.export.gguf import export_gguf

    quant = "tq2_0" if "TQ2_0" in variant else "tq1_0"
    model = random_model(shape, "ternary")
    ranks = {bytes([b]): b for b in range(256)}  # the bytes, then byte pairs up to the model's vocabulary size
    for i in range(shape["vocab_size"] - len(SPECIAL_TOKENS) - 256):
        ranks[bytes(divmod(i, 256))] = 256 + i
    tok = Tokenizer(r"\S+|\s+", ranks, {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)})
    with tempfile.TemporaryDirectory(prefix="ternchat-decode-") as tmp:
        path = Path(tmp) / f"model_{quant}.gguf"
        export_gguf(model, tok, path, quant)
        del model
        llm = Llama(model_path=str(path), n_ctx=shape["seq_len"], n_threads=os.cpu_count(), verbose=False)
        size = path.stat().st_size

        rss = []

        def timed() -> tuple[float, int]:
            llm.reset()
            llm.eval(list(range(10, 10 + PROMPT_TOKENS)))
            stamps = []
            for _ in range(tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                stamps.append(time.perf_counter())
                llm.eval([token])
            rss.append(_resident_bytes())
            return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

        start = time.perf_counter()
        timed()
        warmup_s = time.perf_counter() - start
        tok_s, count = timed()
    return {"tok_s": tok_s, "tokens": count, "weight_bytes": size, "rss_bytes": rss[-1], "warmup_s": warmup_s}


def _child(shape: dict, variant: str, tokens: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    run = _decode_llama_cpp if variant.startswith("llama.cpp") else _decode_ternchat
    return run(shape, variant, tokens)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def bench_decode(tokens: int, shapes: list[str] | None = None, log=print) -> dict:
    from ternchat.export.gguf import llama_cpp_problems
    from ternchat.model.gpt import GPTShape

    rows = []
    for name in shapes or list(SHAPES):
        shape = SHAPES[name]
        for variant in VARIANTS:
            row = {"model": name, "variant": variant}
            if variant.startswith("llama.cpp"):
                problems = llama_cpp_problems(GPTShape(**shape, quant="ternary"))
                if problems:
                    rows.append({**row, "skipped": "the bitnet graph does not apply: " + "; ".join(problems)})
                    continue
                if not llama_cpp_available():
                    rows.append({**row, "skipped": "llama-cpp-python is not installed"})
                    continue
            log(f"{name}: {variant} ...")
            done = subprocess.run([sys.executable, "-m", "ternchat.bench.decode_bench", "--child", json.dumps(shape),
                                   variant, str(tokens)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"decode bench {name} / {variant} failed:\n{done.stderr[-3000:]}")
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            log(f"  {row['tok_s']:,.1f} tok/s, resident {row['rss_bytes'] / 2 ** 20:,.0f} MiB")
            rows.append(row)
    return {"machine": machine(), "tokens": tokens, "prompt_tokens": PROMPT_TOKENS, "threads": os.cpu_count(),
            "rows": rows}


def format_decode(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; batch 1, greedy, {report['tokens']} tokens after a "
             f"{report['prompt_tokens']}-token prompt, {report['threads']} threads; each variant in its own process.",
             "", "| model | variant | tok/s | vs dense bf16 (eager) | weights (ternchat: in memory; llama.cpp: file) | "
             "resident while decoding | warm-up |", "|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r["tok_s"] for r in report["rows"] if r["variant"] == "dense bf16" and "tok_s" in r}
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['variant']} | - | - | - | - | {r['skipped']} |")
            continue
        ratio = r["tok_s"] / dense[r["model"]] if r["model"] in dense else float("nan")
        lines.append(f"| {r['model']} | {r['variant']} | {r['tok_s']:,.1f} | {ratio:.2f}x | "
                     f"{r['weight_bytes'] / 2 ** 20:,.1f} MiB | {r['rss_bytes'] / 2 ** 20:,.0f} MiB | "
                     f"{r['warmup_s']:.1f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "VARIANT", "TOKENS"))
    args = parser.parse_args()
    shape_arg, variant_arg, tokens_arg = args.child
    print(json.dumps(_child(json.loads(shape_arg), variant_arg, int(tokens_arg))))
