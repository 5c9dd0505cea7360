"""Muon: momentum orthogonalized by Newton-Schulz, for 2-D weight matrices.

Keller Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks". Each
step: Nesterov momentum `m = beta m + (1 - beta) g`, `u = (1 - beta) g + beta m`; `u` is
replaced by an approximation of its polar factor U V^T (from u = U S V^T) with five iterations of
the quintic Newton-Schulz map X <- aX + (bA + cA^2)X, A = XX^T, (a, b, c) = (3.4445, -4.7750,
2.0315), which pushes all singular values towards [0.7, 1.2] without an SVD. The update is
scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike, and weight decay is
decoupled: W <- W(1 - lr wd) - lr update.
"""

from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor of a 2-D matrix, computed in bfloat16 as in the reference code."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - beta)
                update = g.lerp(buf, beta) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"]).to(p.dtype)
                update *= max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
