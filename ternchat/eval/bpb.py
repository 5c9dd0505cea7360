"""Validation loss and bits per byte on the held-out crates.

Bits per byte = (summed cross-entropy in nats) / (ln 2 * summed UTF-8 bytes of the target
tokens), so models with different tokenizers compare fairly. Special tokens (<|bos|>, <|eod|>)
have no bytes and are left out of both sums, as nanochat does.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Sequence

import torch

from ternchat.data.loader import TokenLoader


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, loader: TokenLoader, token_bytes: torch.Tensor, batches: int,
                 autocast: AbstractContextManager) -> dict[str, float]:
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64)
    nbytes = torch.zeros((), dtype=torch.float64)
    loss_sum, count = 0.0, 0
    for _ in range(min(batches, loader.steps_per_epoch)):
        x, y = loader.next_batch()
        with autocast:
            losses = model(x, y, reduction="none").float()
        per_token_bytes = token_bytes[y.reshape(-1)]
        counted = per_token_bytes > 0
        nats += (losses * counted).sum().double().cpu()
        nbytes += per_token_bytes.sum().double().cpu()
        loss_sum += losses.sum().item()
        count += losses.numel()
    model.train(was_training)
    return {"val_loss": loss_sum / max(count, 1), "val_bpb": (nats / (math.log(2) * nbytes.clamp(min=1))).item(),
            "val_tokens": count}


def held_out_bpb(model: torch.nn.Module, val_paths: Sequence[Path], token_bytes: torch.Tensor, batch_size: int,
                 seq_len: int, batches: int, autocast: AbstractContextManager, tokenizer_hash: str) -> dict[str, float]:
    """`evaluate_bpb` on the first `batches` batches of the val shards, in order, on `token_bytes`' device: the
    same tokens whichever run or stage is measured."""
    loader = TokenLoader(val_paths, batch_size, seq_len, shuffle=False, tokenizer_hash=tokenizer_hash,
                         device=token_bytes.device, verify=False)
    return evaluate_bpb(model, loader, token_bytes, batches, autocast)
