"""FOAM: Adam with blocked state folding (Wen et al. 2025, arXiv:2512.07112), as its official code does.

The moments are kept folded: block means over 2^l adjacent entries along the last (input)
dimension, so they take 1/2^l of Adam's memory. Each step, following the official optimizer
(zqOuO/FOAM `foam_torch/foam_adam.py`):
    m~ <- b1 m~ + (1 - b1) fold(g)            fold = block mean
    v~ <- b2 v~ + (1 - b2) fold(g * g)        the block mean of g^2, not the square of fold(g)
    R = g - unfold(fold(g))                   the current gradient's residual, never stored
    m = unfold(m~) + alpha R,   v = unfold(v~) + alpha^2 R^2
    p <- p (1 - lr wd) - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * m / (sqrt(v) + eps)
so the bias correction multiplies the whole ratio, residual term included, and `scale` (0.25 in
the official training scripts) shrinks the update of the folded matrices. Where the paper's
equations read differently (v~ from the square of the folded gradient; only the folded moments
bias-corrected) this module follows the code that produced the paper's results. At level 0 the
fold is the identity, R = 0, and with scale 1 FOAM is Adam(W). Two choices of ours: a tensor whose
last dimension is not a multiple of 2^l uses the largest level that divides it (the official code
pads with zeros, which biases the last block's means), and weight decay is applied before the
update as in torch.optim.AdamW (the official code applies it after; the difference is second order).
"""

from __future__ import annotations

import math

import torch


def fold_level(last_dim: int, level: int) -> int:
    while level > 0 and last_dim % (2 ** level):
        level -= 1
    return level


def fold(x: torch.Tensor, level: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] >> level, 1 << level).mean(dim=-1)


def unfold(x: torch.Tensor, level: int) -> torch.Tensor:
    return x.repeat_interleave(1 << level, dim=-1)


class FOAM(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 level: int = 3, alpha: float = 1.0, scale: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, level=level,
                                      alpha=alpha, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), eps, lr, wd, alpha = (group["betas"], group["eps"], group["lr"], group["weight_decay"],
                                            group["alpha"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                level = fold_level(g.shape[-1], group["level"])
                state = self.state[p]
                state["step"] = step = state.get("step", 0) + 1
                g_folded = fold(g, level)
                m = state.setdefault("exp_avg_folded", torch.zeros_like(g_folded))
                v = state.setdefault("exp_avg_sq_folded", torch.zeros_like(g_folded))
                m.lerp_(g_folded, 1 - b1)
                v.mul_(b2).add_(fold(g * g, level), alpha=1 - b2)
                residual = g - unfold(g_folded, level)
                m_full = unfold(m, level).add_(residual, alpha=alpha)
                v_full = unfold(v, level).add_(residual.square(), alpha=alpha ** 2)
                step_size = lr * group["scale"] * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
                p.mul_(1 - lr * wd)
                p.add_((m_full / (v_full.sqrt() + eps)).to(p.dtype), alpha=-step_size)
