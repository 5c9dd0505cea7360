"""Load a GGUF export in llama.cpp (llama-cpp-python) and compare its logits with ternchat's.

    .venv/bin/pip install llama-cpp-python      # builds llama.cpp from source once (about ten minutes on
                                                # two cores); pip keeps the wheel, later installs take seconds
    .venv/bin/python scripts/check_gguf.py --run RUN [--gguf RUN/model_tq2_0.gguf ...]

Every file is fed the same token ids (ternchat's tokenization of the evaluation prompts, so the two
tokenizers' pre-tokenization does not enter), with the KV cache in F32. Reported per file, over all
positions: how often llama.cpp's top token is ternchat's, and the largest |logit difference| against
(a) ternchat as it runs (int8 activations per token) and (b) ternchat with llama.cpp's Q8_K activations
(int8 per block of 256 values) in the ternary matmuls, which isolates what the activation format explains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ternchat.model.bitlinear import TernaryLinear  # noqa: E402
from ternchat.runs import load_model_and_tokenizer  # noqa: E402
from ternchat.verify.humaneval import load_problems  # noqa: E402


def q8k_activation(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_K activations: int8 with one absmax scale per block of 256 along the row."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 256)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = (blocks * scale).round().clamp(-128, 127)
    return torch.where(amax > 0, q / scale, torch.zeros_like(q)).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def q8k_activations():
    original = TernaryLinear.forward
    TernaryLinear.forward = lambda self, x: F.linear(q8k_activation(x), self.weight_values().to(x.dtype))
    try:
        yield
    finally:
        TernaryLinear.forward = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, action="append", help="GGUF file(s) (default: RUN/model_tq*.gguf)")
    parser.add_argument("--prompts", type=int, default=6, help="evaluation prompts to compare on")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is missing: .venv/bin/pip install llama-cpp-python (builds llama.cpp once)")
    model, tok = load_model_and_tokenizer(args.run)
    model = model.float().eval()
    files = args.gguf or sorted(args.run.glob("model_tq*.gguf"))
    if not files:
        sys.exit(f"no GGUF file given and none in {args.run}: ternchat export --run {args.run} --format gguf")
    sequences = [[tok.bos_id] + tok.encode(p.prompt)[:model.shape.seq_len - 1] for p in load_problems()[:args.prompts]]
    with torch.no_grad():
        exact = [model(torch.tensor([ids]))[0].numpy() for ids in sequences]
        with q8k_activations():
            emulated = [model(torch.tensor([ids]))[0].numpy() for ids in sequences]
    results = []
    for path in files:
        llm = Llama(model_path=str(path), n_ctx=model.shape.seq_len, logits_all=True, n_threads=2, type_k=0,
                    type_v=0, verbose=False)  # type 0: F32 KV cache
        same, positions, diffs_exact, diffs_q8k = 0, 0, [], []
        for ids, ours, ours_q8k in zip(sequences, exact, emulated):
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
            same += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            positions += len(ids)
            diffs_exact.extend(np.abs(theirs - ours).max(axis=-1))  # per position, over the vocabulary
            diffs_q8k.extend(np.abs(theirs - ours_q8k).max(axis=-1))
        result = {"file": path.name, "bytes": path.stat().st_size, "positions": positions, "same_top_token": same,
                  "logit_range": float(max(np.abs(o).max() for o in exact))}
        for label, diffs in (("vs_ternchat", diffs_exact), ("vs_ternchat_q8k", diffs_q8k)):
            result[f"max_abs_diff_{label}"] = float(np.max(diffs))
            result[f"median_abs_diff_{label}"] = float(np.median(diffs))
            result[f"positions_within_1e-4_{label}"] = int((np.array(diffs) < 1e-4).sum())
        results.append(result)
        print(f"{path.name}: {result['bytes'] / 2 ** 20:.2f} MiB; top token equal at {same}/{positions} positions; "
              f"|logit diff| per position, median / max: {result['median_abs_diff_vs_ternchat']:.4f} / "
              f"{result['max_abs_diff_vs_ternchat']:.4f} against ternchat, "
              f"{result['median_abs_diff_vs_ternchat_q8k']:.4f} / {result['max_abs_diff_vs_ternchat_q8k']:.4f} "
              f"against ternchat with Q8_K activations ({result['positions_within_1e-4_vs_ternchat_q8k']} positions "
              f"within 1e-4); logits reach {result['logit_range']:.1f}")
        del llm
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
