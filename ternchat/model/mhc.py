"""Manifold-constrained hyper-connections (mHC; Xie et al., DeepSeek, arXiv 2512.24880), built on
hyper-connections (HC; Zhu et al., arXiv 2409.19606).

The residual state is n streams of width C, x in R^{n x C} per token: the embedding is copied into
every stream once (`ResidualStreams.expand`) and the streams are averaged once before the final norm
(`contract`); in between they persist through every block. Each attention and MLP sublayer F
(its pre-norm included) is wrapped as

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

with coefficients computed per token from the whole state (`HyperConnection.mappings`), in fp32
whatever the autocast dtype: the flattened state x (nC values) is divided by its RMS
r = ||x|| / sqrt(nC), projected by phi (nC -> n^2 + 2n), scaled by the gating factors alpha and
shifted by the static bias b:

    H~_pre = alpha_pre (x phi_pre) / r + b_pre          H_pre  = sigmoid(H~_pre)        (1 x n)
    H~_post = alpha_post (x phi_post) / r + b_post      H_post = 2 sigmoid(H~_post)     (1 x n)
    H~_res = alpha_res mat(x phi_res) / r + b_res       H_res  = Sinkhorn-Knopp(exp(H~_res))  (n x n)

Sinkhorn-Knopp alternates row and column normalization (`sinkhorn_iters` of each, the paper's 20)
and lands on a doubly-stochastic matrix: non-negative, rows and columns summing to 1, so a product
of any number of them keeps the signal's mean and cannot amplify it (the paper's composite gain ~1.6
against ~3000 for unconstrained HC). Its backward recomputes the iterations instead of storing them,
as Megatron-LM's reference does. `constraint = "none"` is HC as the ablation: H~ = b + alpha tanh(.)
used as is, unconstrained.

Initialization, where the paper is silent (the gating factors alpha start at its 0.01): phi starts
at zero, so every H is input-independent at step 0 (phi's gradient is alpha times the coefficients',
non-zero once the zero-initialized sublayer outputs have moved);
b_pre = logit(1/n), so H_pre averages the streams; b_post = 0, so H_post = 1 for every stream;
b_res is 0 on the diagonal and -2 off it, so H_res = 0.71 I + 0.097 (1 - I): identity-leaning, as
HC's identity init (an exact identity would need infinite logits), but not so close to a permutation
that 20 iterations stop short (at -4 the rows miss 1 by 2e-3 with a little noise; at -2 by 1e-5).
With the streams equal copies of the embedding, any doubly-stochastic H_res maps them to
themselves and every stream gets the same update, so the streams stay equal and the model computes
exactly the plain pre-norm residual's function at init (tested). For HC, b_pre = 1/n, b_post = 1
and b_res = I give the same.

Phi is a 2-D matrix inside the block and goes to the matrix optimizer (Muon), the gating factors
and biases to AdamW with the norm gains, as DeepSeek-V4 trains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

Sublayer = Callable[[torch.Tensor], torch.Tensor]
OFF_DIAGONAL_LOGIT = -2.0


def _to_tokens_last(logits: torch.Tensor) -> torch.Tensor:
    # (..., n, n) -> (n, n, tokens): each normalization then sums whole rows of tokens, which
    # vectorizes; summing 4 strided values per token is several times slower on a CPU
    n = logits.shape[-1]
    return logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _from_tokens_last(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return m.permute(2, 0, 1).reshape(shape)


def _exp(logits: torch.Tensor) -> torch.Tensor:
    # exp with the row maximum subtracted: a row's common factor is what the first row normalization
    # removes, so this is Sinkhorn of exp(logits) without overflow
    return torch.exp(logits - logits.amax(dim=1, keepdim=True))


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp on (n, n, tokens) matrices. The backward recomputes the iterations from the
    logits (no 2 x iters intermediates kept per token between forward and backward) and runs each
    normalization's adjoint by hand: for y = a / s, s = sum(a), dL/da = (g - sum(g y)) / s."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters = iters
        m = _exp(logits)
        for _ in range(iters):
            m = m / m.sum(dim=1, keepdim=True)
            m = m / m.sum(dim=0, keepdim=True)
        return m

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        start = m = _exp(logits)
        steps = []
        for _ in range(ctx.iters):
            for dim in (1, 0):
                total = m.sum(dim=dim, keepdim=True)
                m = m / total
                steps.append((m, total, dim))
        for out, total, dim in reversed(steps):
            grad = (grad - (grad * out).sum(dim=dim, keepdim=True)) / total
        return grad * start, None


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """The doubly-stochastic matrix Sinkhorn-Knopp reaches from exp(`logits`) (..., n, n), in the input's dtype."""
    return _from_tokens_last(_Sinkhorn.apply(_to_tokens_last(logits), iters), logits.shape)


class HyperConnection(nn.Module):
    """The mHC (or HC) wiring of one sublayer over `streams` residual streams of width `width`."""

    def __init__(self, width: int, streams: int, sinkhorn_iters: int = 20, constraint: str = "sinkhorn",
                 gate_init: float = 0.01):
        super().__init__()
        if constraint not in ("sinkhorn", "none"):
            raise ValueError(f"unknown hyper-connection constraint {constraint!r}; choose sinkhorn or none")
        n = self.n = streams
        self.iters, self.constrained = sinkhorn_iters, constraint == "sinkhorn"
        self.phi = nn.Parameter(torch.zeros(n * n + 2 * n, n * width))
        self.alpha = nn.Parameter(torch.full((3,), float(gate_init)))
        self.bias = nn.Parameter(torch.zeros(n * n + 2 * n))
        self.reset_bias()

    @torch.no_grad()
    def reset_bias(self) -> None:
        n = self.n
        if self.constrained:
            pre, post = torch.full((n,), math.log(1 / (n - 1))), torch.zeros(n)
            res = torch.full((n, n), OFF_DIAGONAL_LOGIT).fill_diagonal_(0.0)
        else:
            pre, post, res = torch.full((n,), 1 / n), torch.ones(n), torch.eye(n)
        self.bias.copy_(torch.cat([pre, post, res.flatten()]))

    def mappings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (..., n), H_post (..., n), H_res (..., n, n) in fp32 for the state x (..., n, C)."""
        n = self.n
        with torch.autocast(x.device.type, enabled=False):
            flat = x.float().flatten(-2)
            inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
            dynamic = (flat @ self.phi.float().t()) * inv_rms
            if not self.constrained:
                dynamic = torch.tanh(dynamic)
            alpha = self.alpha.float()
            scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
            h = dynamic * scale + self.bias.float()
            pre, post, res = h[..., :n], h[..., n:2 * n], h[..., 2 * n:].unflatten(-1, (n, n))
            if self.constrained:
                return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res, self.iters)
            return pre, post, res

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        """x (B, T, n, C) -> H_res x + H_post^T sublayer(H_pre x); the sublayer sees (B, T, C)."""
        pre, post, res = self.mappings(x)
        streams = x.float()
        # broadcast products, not batched n x n matmuls: per token these are tiny, and bmm over
        # millions of 4 x 4 matrices is several times slower on a CPU
        y = sublayer((pre.unsqueeze(-1) * streams).sum(-2).to(x.dtype))
        mixed = (res.unsqueeze(-1) * streams.unsqueeze(-3)).sum(-2) + post.unsqueeze(-1) * y.float().unsqueeze(-2)
        return mixed.to(x.dtype)


class PlainResidual(nn.Module):
    """x + F(x): the residual wiring when mHC is off."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return x + sublayer(x)


class ResidualStreams(nn.Module):
    """Expand to n streams after the embedding and contract before the final norm (identity when n = 1)."""

    def __init__(self, streams: int):
        super().__init__()
        self.n = streams

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n == 1 else x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1]).contiguous()

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n == 1 else x.mean(dim=-2)


@dataclass(frozen=True)
class HyperShape:
    streams: int  # residual streams (> 1)
    sinkhorn_iters: int = 20
    constraint: str = "sinkhorn"  # sinkhorn (mHC) or none (HC)
    gate_init: float = 0.01

    @classmethod
    def from_config(cls, mhc) -> "HyperShape | None":
        """The shape of the config's `[mhc]` section; None when it is off."""
        return cls(mhc.streams, mhc.sinkhorn_iters, mhc.constraint, mhc.gate_init) if mhc.enabled else None


def make_residual(shape) -> nn.Module:
    """The layer factory's residual wiring of one sublayer: plain, or mHC/HC over the shape's streams."""
    h = shape.mhc
    if h is None or h.streams == 1:
        return PlainResidual()
    return HyperConnection(shape.d_model, h.streams, h.sinkhorn_iters, h.constraint, h.gate_init)


def composite_gain(model: nn.Module, idx: torch.Tensor) -> dict[str, float]:
    """The paper's stability measure for the tokens `idx`: the product of every sublayer's H_res, from
    the first block to the last, and its largest absolute row sum (forward gain) and column sum
    (backward gain), the maximum over tokens."""
    product: torch.Tensor | None = None

    def record(module: HyperConnection, args: tuple) -> None:
        nonlocal product
        _, _, res = module.mappings(args[0])
        product = res if product is None else res @ product

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, HyperConnection)]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    if product is None:
        raise ValueError("the model has no hyper-connections")
    return {"forward_gain": float(product.abs().sum(-1).amax()), "backward_gain": float(product.abs().sum(-2).amax())}
