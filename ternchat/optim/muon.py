"""Muon: momentum orthogonalized by Newton-Schulz, for 2-D weight matrices.

Keller Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks". Each
step: Nesterov momentum `m = beta m + (1 - beta) g`, `u = (1 - beta) g + beta m`; `u` is
replaced by an approximation of its polar factor U V^T (from u = U S V^T) with five iterations of
the quintic Newton-Schulz map X <- aX + (bA + cA^2)X, A = XX^T, (a, b, c) = (3.4445, -4.7750,
2.0315), which pushes all singular values towards [0.7, 1.2] without an SVD. The update is
scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike, and weight decay is
decoupled: W <- W(1 - lr wd) - lr update. Matrices of one shape are orthogonalized together in
batched iterations over stacks of up to NS_CHUNK_VALUES values, which bounds the step's temporary
memory (16-21 bytes per stacked value, measured; see ternchat/plan.py) at any model size.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ternchat.model.linear import bf16_native
from ternchat.optim.quant8 import StateCodec

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_CHUNK_VALUES = 1 << 26  # matrices stacked into one batched Newton-Schulz run, counted in values


def stack_size(rows: int, cols: int) -> int:
    """How many rows x cols matrices one batched Newton-Schulz run takes."""
    return max(1, NS_CHUNK_VALUES // (rows * cols))


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor of a matrix, or of each matrix in a (batch, m, n) stack, in bfloat16
    as in the reference code where the device multiplies bf16 natively, else in fp32 (emulated bf16
    products are several times slower than fp32 ones, and Newton-Schulz is all products)."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if bf16_native(g.device) else g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon; with `state_bits=8` the momentum is stored as blockwise int8 (8-bit Muon, arXiv:2509.23106):
    each step dequantizes it, updates it, orthogonalizes, and quantizes it again."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, state_bits: int = 32, block_size: int = 2048,
                 stochastic_rounding: bool = False, seed: int = 0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, ns_steps=ns_steps))
        self.codec = StateCodec(state_bits, block_size, stochastic_rounding, seed)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        self._slot = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            stacks = [((rows, cols), params[i:i + stack_size(rows, cols)]) for (rows, cols), params in by_shape.items()
                      for i in range(0, len(params), stack_size(rows, cols))]
            for (rows, cols), params in stacks:
                grads = [p.grad.float() for p in params]
                bufs = [self.codec.load(self.state[p], "momentum_buffer", p) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - beta)
                for p, buf in zip(params, bufs):
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1
                    self.codec.store(state, "momentum_buffer", buf, state["step"], self._slot[p])
                updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
                orthogonal = newton_schulz(torch.stack(updates), group["ns_steps"])
                scale = max(1.0, rows / cols) ** 0.5
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, list(orthogonal.to(params[0].dtype).unbind(0)), alpha=-lr * scale)
