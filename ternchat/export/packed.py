"""Packed ternary export: 5 trits per byte (1.6 bits per weight) plus one scale per matrix.

Every block matrix is stored as its ternary codes {-1, 0, +1}, shifted to {0, 1, 2} and packed
base-3, five to a byte (3^5 = 243 <= 256), with its fp32 absmean scale beta. The token embedding
and LM head are stored in bf16 (or fp32 with `float_dtype`), norm gains, mHC's coefficient maps and
LoopLM's exit gate in fp32, all in one
safetensors file whose metadata holds the model shape, the tokenizer (its two files' texts and
hash), the chat format and the training stage that made the model, so the file alone samples,
chats, serves and evaluates on any machine. Loading rebuilds the GPT with inference-form ternary
layers whose weights are exactly the training forward's. Files written before the tokenizer was
embedded hold only its hash; they load with the `tokenizer/` folder beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ternchat.data.chat import CHAT_FORMAT
from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.model.bitlinear import BitLinear, TernaryLinear, to_inference
from ternchat.model.gpt import GPT, GPTShape

FORMAT = "ternchat-packed-2"  # 2: q, k, v as separate matrices
TRITS_PER_BYTE = 5
_POWERS = torch.tensor([3 ** i for i in range(TRITS_PER_BYTE)], dtype=torch.int32)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Flatten codes in {-1, 0, 1} and pack five per uint8."""
    digits = (codes.reshape(-1).to(torch.int32) + 1)
    pad = (-digits.numel()) % TRITS_PER_BYTE
    digits = torch.cat([digits, torch.ones(pad, dtype=torch.int32)])  # pad with code 0
    return (digits.view(-1, TRITS_PER_BYTE) * _POWERS).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    values = packed.to(torch.int32).unsqueeze(1)
    digits = (values // _POWERS) % 3
    return (digits.reshape(-1)[:count] - 1).to(torch.int8)


def export_packed(model: GPT, path: Path, tokenizer: Tokenizer, float_dtype: torch.dtype = torch.bfloat16,
                  stage: str = "pretrain") -> dict:
    """Write `model` packed to `path` with `tokenizer` and the training `stage` that made it; return
    sizes in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    packed_weights = set()
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            packed_weights.add(f"{name}.weight")
            module = TernaryLinear.from_bitlinear(module)
        if isinstance(module, TernaryLinear):
            tensors[f"{name}.codes"] = pack_trits(module.codes)
            tensors[f"{name}.beta"] = module.beta.reshape(1)
    # embedding, head and dense block linears in float_dtype; everything else (norm gains, the hyper-connections'
    # coefficient maps, which run in fp32, the exit gate) stays fp32
    low_precision = {f"{name}.weight" for name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}
    for name, p in model.named_parameters():
        if name in packed_weights:
            continue
        tensors[name] = p.detach().to(float_dtype if name in low_precision else torch.float32).contiguous()
    metadata = {"format": FORMAT, "shape": json.dumps(model.shape.to_dict()), "tokenizer_hash": tokenizer.hash,
                "tokenizer": json.dumps(tokenizer.files()), "chat_format": CHAT_FORMAT, "stage": stage}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    n_params = model.parameter_counts()["total"]
    ternary = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".codes", ".beta")))
    return {"packed_bytes": Path(path).stat().st_size, "ternary_bytes": ternary,
            "other_bytes": sum(t.numel() * t.element_size() for t in tensors.values()) - ternary,
            "tokenizer_bytes": len(metadata["tokenizer"]),
            "fp32_bytes": 4 * n_params, "bf16_bytes": 2 * n_params}


@dataclass
class PackedModel:
    model: GPT
    tokenizer_hash: str
    tokenizer: Tokenizer | None  # None in files written before the tokenizer was embedded
    stage: str


def load_packed(path: Path) -> PackedModel:
    """The inference model stored at `path`, with its tokenizer and training stage."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise DataError(f"{path} is not a ternchat packed model (format {meta.get('format')!r})")
        if meta.get("chat_format", CHAT_FORMAT) != CHAT_FORMAT:
            raise DataError(f"{path} renders conversations as {meta['chat_format']!r}; this ternchat knows "
                            f"{CHAT_FORMAT!r}. Use the ternchat version that exported it.")
        tokenizer = Tokenizer.from_files(json.loads(meta["tokenizer"]), str(path)) if "tokenizer" in meta else None
        if tokenizer is not None and tokenizer.hash != meta["tokenizer_hash"]:
            raise DataError(f"{path}: its tokenizer's hash {tokenizer.hash[:12]} is not the recorded "
                            f"{meta['tokenizer_hash'][:12]}")
        shape = GPTShape.from_dict(json.loads(meta["shape"])).for_inference()
        model = GPT(shape)
        if shape.quant == "ternary":
            to_inference(model)
        state = {}
        for name, module in model.named_modules():
            if isinstance(module, TernaryLinear):
                count = module.out_features * module.in_features
                codes = unpack_trits(f.get_tensor(f"{name}.codes"), count).view(module.out_features, module.in_features)
                state[f"{name}.codes"] = codes
                state[f"{name}.beta"] = f.get_tensor(f"{name}.beta").reshape(())
        for name, p in model.named_parameters():
            state[name] = f.get_tensor(name).float()
        if shape.tie_embeddings:  # one stored matrix, two names in the model
            state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return PackedModel(model.eval(), meta["tokenizer_hash"], tokenizer, meta.get("stage", "pretrain"))
