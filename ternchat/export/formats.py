"""`ternchat export`: a run's model as ternchat's packed file, a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.model.gpt import GPT

NEEDS = {"hf": ("transformers", "accelerate"), "gguf": ("gguf",)}


def check_export_tools(fmt: str) -> None:
    missing = [name for name in NEEDS.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise DataError(f"--format {fmt} needs {', '.join(missing)}: .venv/bin/pip install -e '.[export]'")


def check_texts() -> list[str]:
    """Texts to compare an export on: the evaluation problems' prompts (Rust the model was trained for)."""
    from ternchat.verify.humaneval import load_problems

    return [p.prompt for p in load_problems()[:4]]


def export_model(model: GPT, tok: Tokenizer, run: Path, fmt: str, out: Path | None = None, *, quant: str = "tq2_0",
                 float_dtype: str | None = None, layout: str = "auto", check: bool = False, stage: str = "pretrain",
                 log=print) -> Path:
    """Write `model` (loaded from the run folder `run`) in format `fmt`; returns the path written."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[float_dtype or ("bf16" if fmt == "packed" else "fp32")]
    if fmt == "hf":
        from ternchat.export.hf import check_logits, export_hf

        out = out or run / "hf"
        written = export_hf(model, tok, run / "tokenizer", out, dtype, layout)
        log(f"wrote {out}: {written['layout']}, {written['bytes'] / 2 ** 20:.2f} MiB"
            + ("; the MTP heads are not exported" if written["mtp_dropped"] else ""))
        if check:
            result = check_logits(out, model, tok, check_texts())
            log(f"transformers ({result['class']}) against ternchat, fp32, {result['tokens']} positions: max |logit "
                f"difference| {result['max_abs_logit_diff']:.3g}, {result['within_1e-4']} positions within 1e-4, "
                f"same top token at {result['same_top_token']}; generate() greedy: {result['greedy_agree']} of "
                f"{len(result['greedy_ternchat'])} tokens as ternchat's")
        return out
    if fmt == "gguf":
        from ternchat.export.gguf import export_gguf

        out = out or run / f"model_{quant}.gguf"
        written = export_gguf(model, tok, out, quant, dtype, run.name)
        log(f"wrote {out}: llama.cpp bitnet, {quant.upper()} block matrices, {written['bytes'] / 2 ** 20:.2f} MiB"
            + ("; the MTP heads are not exported" if written["mtp_dropped"] else "")
            + f". Check it in llama.cpp: python scripts/check_gguf.py --run {run} --gguf {out}")
        return out
    from ternchat.export.packed import export_packed

    out = out or run / "model_packed.safetensors"
    sizes = export_packed(model, out, tok, dtype, stage=stage)
    mib = 2 ** 20
    log(f"wrote {out}: {sizes['packed_bytes'] / mib:.2f} MiB; the same model is {sizes['fp32_bytes'] / mib:.2f} MiB "
        f"in fp32 ({sizes['fp32_bytes'] / sizes['packed_bytes']:.1f}x) and {sizes['bf16_bytes'] / mib:.2f} MiB in "
        f"bf16 ({sizes['bf16_bytes'] / sizes['packed_bytes']:.1f}x). Ternary matrices "
        f"{sizes['ternary_bytes'] / mib:.2f} MiB, embedding, head and gains {sizes['other_bytes'] / mib:.2f} MiB, "
        f"tokenizer {sizes['tokenizer_bytes'] / mib:.2f} MiB: the file alone samples, chats, serves and evaluates.")
    return out
