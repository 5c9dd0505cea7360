"""Activation checkpointing: each transformer block recomputes its activations in the backward pass.

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost", as PyTorch runs it
(`torch.utils.checkpoint`, non-reentrant) and torchtitan configures it. `train.activation_checkpointing`:

- "full": a block keeps only its input; backward re-runs its whole forward. Activation memory
  falls from every block's intermediates to one residual stream per block plus one block's
  intermediates at a time, for about one more forward pass of compute.
- "selective": torchtitan's op-level policy (`torch.utils.checkpoint.create_selective_checkpoint_contexts`):
  the outputs of the matrix multiplies and of attention are saved, everything elementwise (norms,
  RoPE, ReLU², the 8-bit activation and ternary weight fake-quantization) is recomputed. For
  BitLinear the reductions that give its scales (absmax per token, absmean per weight, the
  `amax` and `mean` ops) are saved too, so the recompute re-quantizes with exactly the scales of
  the forward and costs no second reduction over each weight.
- "none": no recompute.

Only training forwards recompute (grad enabled, no KV cache); evaluation and generation run the
block as is. Gradients equal those without checkpointing (a test checks it): the recompute runs
the same ops on the same inputs.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    # BitLinear's scales: per-token absmax of the input, absmean of the weight
    torch.ops.aten.amax.default,
    torch.ops.aten.mean.default,
}


def _save_matmuls_attention_and_scales(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_options(mode: str) -> dict[str, Callable] | None:
    """The keyword arguments `torch.utils.checkpoint.checkpoint` takes for `mode`; None = no checkpointing.

    "full" passes no `context_fn` at all: torch.compile cannot trace the default `noop_context_fn`
    when it is passed explicitly (it fails with "checkpoint not implemented for ... context_fn")."""
    if mode == "none":
        return None
    if mode == "full":
        return {}
    if mode == "selective":
        return {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls_attention_and_scales)}
    raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {', '.join(MODES)}")


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Make every transformer block of `model` recompute its activations in backward (`mode` != "none")."""
    options = checkpoint_options(mode)
    for block in model.blocks:
        block.recompute = options
