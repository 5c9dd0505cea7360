"""GGUF export for llama.cpp: its `bitnet` graph with ternary TQ2_0 or TQ1_0 block matrices.

llama.cpp's `bitnet` architecture is the BitNet b1.58 block with SubLN: RMSNorm -> q, k, v -> NEOX RoPE (the
two halves of each head, as ternchat rotates) -> attention -> attn_sub_norm -> o; RMSNorm -> silu(gate) * up
-> ffn_sub_norm -> down; a final RMSNorm and a head tied to the token embedding. That is ternchat with
`mlp = "swiglu"`, `qk_norm = false` and `tie_embeddings = true`; TQ1_0 and TQ2_0 also need every matrix's
input dimension to be a multiple of 256 (their block). Each ternary matrix is written as its codes
{-1, 0, +1} quantized with `gguf`'s own TQ quantizer (every block's scale d = max|codes| = 1 is exact in
fp16, so the codes round-trip exactly) plus an F32 `.scale` tensor holding beta, which the graph multiplies
the matmul's output by. TQ2_0 stores 2 bits per weight, TQ1_0 1.6875. llama.cpp's TQ kernels quantize
activations to Q8_K (int8 per block of 256 with its own scale) rather than ternchat's int8 per token, so
logits agree closely, not exactly (`scripts/check_gguf.py` measures it).
The vocabulary, merges and special tokens are ternchat's, as a GPT-2 style byte-level BPE; llama.cpp has no
way to carry ternchat's code-aware split regex, so it pre-tokenizes text with GPT-2's: the ids and decoding
are the same, but llama.cpp may cut a prompt into different tokens than ternchat would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.model.bitlinear import as_ternary
from ternchat.model.gpt import GPT, GPTShape

QUANTS = ("tq2_0", "tq1_0")
BLOCK = 256  # QK_K: the TQ formats' block along a row
_BLOCK_TENSORS = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                  "attn.o_proj": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
                  "attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.sub_norm": "attn_sub_norm",
                  "mlp.sub_norm": "ffn_sub_norm"}


def llama_cpp_problems(s: GPTShape) -> list[str]:
    """Why llama.cpp's bitnet graph cannot run a model of this shape (empty when it can)."""
    problems = []
    if s.quant != "ternary":
        problems.append("quant must be ternary")
    if s.mlp != "swiglu":
        problems.append(f"mlp must be swiglu (is {s.mlp})")
    if s.qk_norm:
        problems.append("qk_norm must be false")
    if not s.tie_embeddings:
        problems.append("tie_embeddings must be true (the graph scores with the token embedding)")
    if s.d_model % BLOCK or s.d_ff % BLOCK:
        problems.append(f"d_model and d_ff must be multiples of {BLOCK} (are {s.d_model} and {s.d_ff})")
    if s.mhc_streams > 1 or s.loop_steps > 1:
        problems.append("mHC streams and LoopLM passes have no counterpart in the bitnet graph")
    return problems


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str], list[int]]:
    """Token strings by id, merges in rank order ("left right"), and token types (1 normal, 3 control)."""
    from gguf import TokenType

    chars = _byte_chars()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    tokens, types = [""] * tok.vocab_size, [int(TokenType.NORMAL)] * tok.vocab_size
    for token, rank in tok.ranks.items():
        tokens[rank] = spell(token)
    for name, rank in tok.specials.items():
        tokens[rank], types[rank] = name, int(TokenType.CONTROL)
    merges = []  # each token of two or more bytes comes from the best-ranked split into two tokens
    for token, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        splits = [(tok.ranks[token[:i]], tok.ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in tok.ranks and token[i:] in tok.ranks]
        if splits:
            i = min(splits)[2]
            merges.append(f"{spell(token[:i])} {spell(token[i:])}")
    return tokens, merges, types


def _qtype(quant: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.TQ2_0 if quant == "tq2_0" else GGMLQuantizationType.TQ1_0


def quantize_codes(codes: torch.Tensor, quant: str) -> np.ndarray:
    """(out, in) codes in {-1, 0, 1} as TQ2_0 or TQ1_0 blocks, by gguf's quantizer."""
    from gguf import quants

    return quants.quantize(codes.to(torch.float32).numpy(), _qtype(quant))


def dequantize_codes(blocks: np.ndarray, quant: str) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(blocks, _qtype(quant))


def export_gguf(model: GPT, tok: Tokenizer, out: Path, quant: str = "tq2_0",
                float_dtype: torch.dtype = torch.float32, name: str = "ternchat") -> dict:
    """Write `model` as a llama.cpp GGUF file; returns its size and tensor count."""
    import gguf

    if quant not in QUANTS:
        raise DataError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    problems = llama_cpp_problems(model.shape)
    if problems:
        raise DataError("llama.cpp's bitnet graph cannot run this model: " + "; ".join(problems)
                        + " (train with these architecture knobs, docs/use.md)")
    s = model.shape
    writer = gguf.GGUFWriter(str(out), "bitnet")
    writer.add_name(name)
    writer.add_context_length(s.seq_len)
    writer.add_embedding_length(s.d_model)
    writer.add_block_count(s.depth)
    writer.add_feed_forward_length(s.d_ff)
    writer.add_head_count(s.n_heads)
    writer.add_head_count_kv(s.n_heads)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(s.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if quant == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0)
    tokens, merges, types = vocab_and_merges(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eod_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)

    def float_tensor(t: torch.Tensor) -> np.ndarray:  # F32, or F16 for a 16-bit float_dtype
        values = t.detach().float().numpy()
        return values if float_dtype == torch.float32 else values.astype(np.float16)

    writer.add_tensor("token_embd.weight", float_tensor(model.embed.weight))
    writer.add_tensor("output_norm.weight", model.final_norm.weight.detach().float().numpy())
    qtype = _qtype(quant)
    for i, block in enumerate(model.blocks):
        for path, short in _BLOCK_TENSORS.items():
            module = block.get_submodule(path)
            if isinstance(module, torch.nn.RMSNorm):
                writer.add_tensor(f"blk.{i}.{short}.weight", module.weight.detach().float().numpy())
                continue
            ternary = as_ternary(module)
            writer.add_tensor(f"blk.{i}.{short}.weight", quantize_codes(ternary.codes, quant), raw_dtype=qtype)
            writer.add_tensor(f"blk.{i}.{short}.scale", ternary.beta.reshape(1).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"bytes": Path(out).stat().st_size, "quant": quant, "mtp_dropped": model.mtp is not None}
