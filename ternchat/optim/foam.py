"""FOAM: Adam with blocked state folding (Wen et al. 2025, arXiv:2512.07112).

The moments are kept folded: block means over 2^l adjacent entries along the last (input)
dimension, so they take 1/2^l of Adam's memory. Each step: g~ = fold(g), m~ <- b1 m~ + (1-b1) g~,
v~ <- b2 v~ + (1-b2) g~^2 (bias-corrected as in Adam); the residual R = g - unfold(g~) is
computed from the current gradient and never stored; m = unfold(m~) + alpha R,
v = unfold(v~) + alpha^2 R^2, and the parameter moves by lr * m / (sqrt(v) + eps) with decoupled
weight decay. At level 0 the fold is the identity, R = 0, and FOAM is exactly Adam(W). A tensor
whose last dimension is not a multiple of 2^l uses the largest level that divides it.
"""

from __future__ import annotations

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
                 level: int = 3, alpha: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, level=level,
                                      alpha=alpha))

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
                v.mul_(b2).addcmul_(g_folded, g_folded, value=1 - b2)
                residual = g - unfold(g_folded, level)
                m_full = unfold(m / (1 - b1 ** step), level) + alpha * residual
                v_full = unfold(v / (1 - b2 ** step), level) + alpha ** 2 * residual.square()
                p.mul_(1 - lr * wd)
                p.add_((m_full / (v_full.sqrt() + eps)).to(p.dtype), alpha=-lr)
