"""GaLore 2 low-rank gradient projection, with an AdamW base (GaLore) or a Muon base (GUM).

GaLore (Zhao et al. 2024, arXiv:2403.03507) keeps optimizer state in a rank-r subspace: for a
matrix gradient G (m x n) it projects from the smaller side, R = P^T G with P (m x r) when m <= n,
else R = G Q with Q (n x r), runs the base optimizer on R, and projects the update back. GaLore 2
(arXiv:2504.20437) refreshes the projector every `update_freq` steps with a **randomized SVD**
(Halko et al. 2011: a Gaussian range finder with `oversample` extra columns and `power_iters`
power iterations, QR-orthonormalized, then the small core's left singular vectors from the
eigendecomposition of core core^T) instead of a full SVD.

GaLore-AdamW restarts its moments at each refresh, because they are coordinates in the old basis,
and bias-corrects them with the steps since that restart (Adam's correction for moments that start
at zero; with the global step instead, the updates of a period would be up to ~2x too large for
beta2 = 0.999). The official code (jiaweizzhao/GaLore) keeps the moments across refreshes and
corrects with the global step, so after a refresh its moments mix coordinates of two bases.

With a Muon base this module implements GUM (Pan et al. 2025, arXiv:2510.17802). Like LISA, it
samples layers: every period, `full_rank_layers` = gamma of the N_L layers (here: the optimizer's
parameter groups, one per transformer block) are drawn uniformly without replacement, so each
layer is drawn with probability q = gamma / N_L and exactly gamma take a full-rank step. A
matrix of a drawn layer keeps momentum R <- beta R + (G - P P^T G) / q on the complement of the
subspace and moves by NS(R); the others keep R <- beta R + P^T G / (1 - q) and move by P NS(R).
What is unbiased is the gradient estimate fed to the momentum: E[G_hat] = (1-q) P P^T G / (1-q)
+ q (G - P P^T G) / q = G. The update is not: Newton-Schulz is nonlinear, and since the momentum
restarts every period (the subspace changes) each buffer holds terms of one weight only, so the
1/q and 1/(1-q) factors cancel inside NS's normalization; they are kept so the buffer is the
paper's unbiased estimate. Matrices below `min_dim` use plain Muon. GaLore's `scale` multiplies
the AdamW-based update only. Randomness (sketches, layer draws, stochastic rounding) comes from
generators seeded by (seed, period, ...), so a resumed run repeats it exactly.
"""

from __future__ import annotations

import torch

from ternchat.optim.muon import newton_schulz
from ternchat.optim.quant8 import StateCodec, seeded_generator


def randomized_svd_basis(g: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthonormal m x rank basis approximating the top-`rank` left singular vectors of g (m x n)."""
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator).to(g)
    y = g @ omega
    for _ in range(power_iters):
        y, _ = torch.linalg.qr(y)
        y = g @ (g.T @ y)
    q, _ = torch.linalg.qr(y)
    core = q.T @ g  # k x n; its left singular vectors are the eigenvectors of core core^T (k x k)
    _, u_small = torch.linalg.eigh(core @ core.T)
    return q @ u_small.flip(-1)[:, :rank]  # eigh sorts ascending


class _Projector:
    """Projects a matrix gradient onto its rank-r subspace from the smaller side, and back."""

    def __init__(self, basis: torch.Tensor, left: bool):
        self.basis, self.left = basis, left

    @classmethod
    def fit(cls, g: torch.Tensor, rank: int, oversample: int, power_iters: int, generator) -> "_Projector":
        left = g.shape[0] <= g.shape[1]
        basis = randomized_svd_basis(g if left else g.T, rank, oversample, power_iters, generator)
        return cls(basis, left)

    def down(self, g: torch.Tensor) -> torch.Tensor:
        return self.basis.T @ g if self.left else g @ self.basis

    def up(self, r: torch.Tensor) -> torch.Tensor:
        return self.basis @ r if self.left else r @ self.basis.T


class _LowRankBase(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict, rank: int, update_freq: int, min_dim: int, oversample: int,
                 power_iters: int, seed: int):
        super().__init__(params, defaults)
        self.rank, self.update_freq, self.min_dim = rank, update_freq, min_dim
        self.oversample, self.power_iters, self.seed = oversample, power_iters, seed
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _gradients(self):
        """(group, parameter, its state, its step count, fp32 gradient) for each parameter with a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1
                    yield group, p, state, state["step"], p.grad.float()

    def uses_galore(self, p: torch.Tensor) -> bool:
        return p.ndim == 2 and min(p.shape) >= self.min_dim and self.rank <= min(p.shape)

    def _projector(self, p: torch.Tensor, g: torch.Tensor, step: int) -> tuple[_Projector, bool]:
        """The period's projector (refit at the first step of each period) and whether it is new."""
        state = self.state[p]
        period = (step - 1) // self.update_freq
        if state.get("period") != period:
            gen = seeded_generator(self.seed, period, self._index[p])
            proj = _Projector.fit(g.float(), self.rank, self.oversample, self.power_iters, gen)
            state["period"], state["basis"], state["left"] = period, proj.basis, proj.left
            return proj, True
        return _Projector(state["basis"], state["left"]), False


class GaLoreAdamW(_LowRankBase):
    """GaLore with AdamW on the projected gradient; full AdamW for matrices it does not project."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, update_freq: int = 200, scale: float = 0.25, min_dim: int = 256,
                 oversample: int = 8, power_iters: int = 2, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), rank, update_freq,
                         min_dim, oversample, power_iters, seed)
        self.scale = scale

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, state, step, g in self._gradients():
            (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
            galore = self.uses_galore(p)
            moment_steps = step
            if galore:
                proj, fresh = self._projector(p, g, step)
                g = proj.down(g)
                if fresh:  # moments live in the old subspace's coordinates: start again
                    state.pop("exp_avg", None), state.pop("exp_avg_sq", None)
                moment_steps = (step - 1) % self.update_freq + 1  # steps since the restart
            m = state.setdefault("exp_avg", torch.zeros_like(g))
            v = state.setdefault("exp_avg_sq", torch.zeros_like(g))
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / (1 - b1 ** moment_steps)) / ((v / (1 - b2 ** moment_steps)).sqrt() + eps)
            if galore:
                update = proj.up(update) * self.scale
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)


class GUM(_LowRankBase):
    """GaLore Unbiased with Muon; each parameter group is one layer of the paper's layer sampling.
    `state_bits=8` keeps the (low-rank or complement) momentum in int8."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 rank: int = 128, update_freq: int = 200, full_rank_layers: int = 1, min_dim: int = 256,
                 oversample: int = 8, power_iters: int = 2, ns_steps: int = 5, state_bits: int = 32,
                 block_size: int = 2048, stochastic_rounding: bool = False, seed: int = 0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps),
                         rank, update_freq, min_dim, oversample, power_iters, seed)
        self._layer = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        # Only layers with a matrix projected below full rank take part in the draw.
        self.layers = sorted({self._layer[p] for g in self.param_groups for p in g["params"] if self.has_complement(p)})
        if self.layers and not 0 < full_rank_layers < len(self.layers):
            raise ValueError(f"GUM draws gamma = {full_rank_layers} full-rank layers per period out of "
                             f"{len(self.layers)}; gamma must be at least 1 and less than the number of layers")
        self.full_rank_layers = full_rank_layers
        self.q = full_rank_layers / len(self.layers) if self.layers else 0.0
        self.codec = StateCodec(state_bits, block_size, stochastic_rounding, seed)

    def has_complement(self, p: torch.Tensor) -> bool:
        return self.uses_galore(p) and self.rank < min(p.shape)

    def full_rank_draw(self, period: int) -> set[int]:
        """The layers (parameter-group indices) that take the full-rank step in `period`."""
        order = torch.randperm(len(self.layers), generator=seeded_generator(self.seed, period, -1))
        return {self.layers[i] for i in order[:self.full_rank_layers].tolist()}

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, state, step, g in self._gradients():
            beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            low_rank = False
            if self.uses_galore(p):
                # At full rank there is no complement to debias: such a matrix never takes that branch.
                q = self.q if self.has_complement(p) else 0.0
                proj, fresh = self._projector(p, g, step)
                if fresh:
                    state["full_rank"] = q > 0 and self._layer[p] in self.full_rank_draw(state["period"])
                    self.codec.drop(state, "momentum")
                low_rank = not state["full_rank"]
                g = proj.down(g) / (1 - q) if low_rank else (g - proj.up(proj.down(g))) / q
            buf = self.codec.load(state, "momentum", g)
            buf.mul_(beta).add_(g)
            self.codec.store(state, "momentum", buf, step, self._index[p])
            update = newton_schulz(buf, group["ns_steps"]).float()
            if low_rank:
                update = proj.up(update)
            update *= max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)
