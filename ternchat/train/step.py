"""One optimizer step, as pretraining, SFT and RL take it: forward and backward over micro-batches,
gradients completed across ranks, a clipped update unless the loss is not finite, gradients zeroed."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

from ternchat.model.linear import bf16_native
from ternchat.optim.factory import CombinedOptimizer
from ternchat.train.distributed import gradients_complete, mean_across_ranks, micro_batch_done


def autocast_for(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = dtype == "bf16" or (dtype == "auto" and bf16_native(device))
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(autocast: contextlib.AbstractContextManager) -> torch.dtype:
    """The dtype the GEMMs run in under `autocast` (an `autocast_for` context)."""
    return autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32


def optimizer_step(forward: Callable, model: torch.nn.Module, optimizer: CombinedOptimizer,
                   batches: Iterable[tuple], grad_accum: int, autocast: contextlib.AbstractContextManager,
                   grad_clip: float, device: torch.device) -> float:
    """One optimizer step over `grad_accum` micro-batches, each the arguments of `forward`, which returns the
    loss; returns the mean loss over the ranks. A non-finite loss skips the update on every rank alike."""
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast:
            loss = forward(*batch) / grad_accum
        loss.backward()
        micro_batch_done(model)
        total += loss.detach()
    gradients_complete(model)
    loss_value = mean_across_ranks(total).item()
    if math.isfinite(loss_value):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad()
    return loss_value
