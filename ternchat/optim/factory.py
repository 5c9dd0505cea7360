"""The optimizer factory: parameter groups -> optimizers, behind one step()/state_dict() face.

2-D matrices inside the transformer blocks go to the matrix optimizer (`optim.matrix_optimizer`:
Muon, or AdamW as a baseline); the token embedding, the LM head and the norm gains go to AdamW,
each with its own learning rate. The trainer sees a `CombinedOptimizer` and nothing else, so new
optimizers plug in here without touching the loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternchat.config import OptimConfig
from ternchat.optim.muon import Muon


class CombinedOptimizer:
    """Several optimizers stepped together; `lr_scale` multiplies every group's base LR."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
                group["base_weight_decay"] = group["weight_decay"]

    def set_schedule(self, lr_scale: float, weight_decay_scale: float = 1.0) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                group["weight_decay"] = group["base_weight_decay"] * weight_decay_scale

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(states)} optimizer states, this run has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors."""
        return sum(t.numel() * t.element_size() for opt in self.optimizers for s in opt.state.values()
                   for t in s.values() if torch.is_tensor(t))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    matrices, gains = [], []
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.ndim == 2:
            matrices.append(p)
        elif name.startswith(("blocks.", "final_norm.")):
            gains.append(p)
    embed = [model.embed.weight]
    head = [model.lm_head.weight]
    betas = (cfg.beta1, cfg.beta2)
    adamw_groups = [dict(params=embed, lr=cfg.lr_embed, weight_decay=0.0),
                    dict(params=head, lr=cfg.lr_head, weight_decay=0.0),
                    dict(params=gains, lr=cfg.lr_scalar, weight_decay=0.0)]
    if cfg.matrix_optimizer == "muon":
        matrix_opt = Muon(matrices, lr=cfg.lr_matrix, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
        return CombinedOptimizer([matrix_opt, torch.optim.AdamW(adamw_groups, betas=betas, eps=1e-8)])
    adamw_groups.append(dict(params=matrices, lr=cfg.lr_matrix, weight_decay=cfg.weight_decay))
    return CombinedOptimizer([torch.optim.AdamW(adamw_groups, betas=betas, eps=1e-8)])
