"""FIRE (ICLR 2026, arXiv 2602.08040; official code isaac7778/FIRE, `language/interventions/fire.py`):
restore plasticity at a stage switch by replacing each weight matrix with its nearest scaled isometry.

The paper's objective: the W' closest to W in Frobenius norm among matrices whose singular values all
equal sqrt(d_out / d_in), i.e. the polar factor W (W^T W)^{-1/2} = U V^T of W = U S V^T, scaled by
sqrt(d_out / d_in). `mode = "exact"` computes it with an SVD (singular values sqrt(d_out / d_in) to
float precision). `mode = "newton_schulz"` is the official code's route: X = W / ||W||_F, then
`iterations` cubic Newton-Schulz steps X <- 1.5 X - 0.5 X X^T X (their language-model setting is 5,
which leaves the singular values far from 1: small ones grow by at most 1.5x a step). Attention's
q, k and v are separate matrices here, as the official code splits its fused c_attn.

Which matrices: the linears inside the transformer blocks (attention and MLP, MTP modules included).
The token embedding is not a linear map of activations and the LM head is left as it is. For a
BitLinear the latent full-precision weight is replaced, so its ternary codes and absmean scale
change with it; `apply_fire` reports how many codes flip.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ternchat.model.bitlinear import BitLinear, ternary_codes, ternary_scale

MODES = ("exact", "newton_schulz")


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """U V^T for W = U S V^T: the orthogonal (semi-orthogonal) matrix nearest to W."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def newton_schulz_isometry(w: torch.Tensor, iterations: int) -> torch.Tensor:
    """The official code's approximation: cubic Newton-Schulz from W / ||W||_F."""
    x = w.T if w.shape[1] > w.shape[0] else w  # iterate on the tall orientation: X^T X is the small Gram
    x = x / x.norm()
    for _ in range(iterations):
        x = 1.5 * x - 0.5 * x @ (x.T @ x)
    return x.T if w.shape[1] > w.shape[0] else x


def nearest_isometry(w: torch.Tensor, mode: str = "exact", iterations: int = 5) -> torch.Tensor:
    """FIRE's replacement of one (d_out, d_in) weight, computed in float32 and returned in W's dtype."""
    if mode not in MODES:
        raise ValueError(f"FIRE mode must be one of {MODES}, got {mode!r}")
    w32 = w.detach().float()
    q = polar_factor(w32) if mode == "exact" else newton_schulz_isometry(w32, iterations)
    return (q * math.sqrt(w.shape[0] / w.shape[1])).to(w.dtype)


def fire_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears FIRE replaces: those inside transformer blocks."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".blocks." in f".{name}" and m.weight.ndim == 2]


@torch.no_grad()
def apply_fire(model: nn.Module, mode: str = "exact", iterations: int = 5) -> dict:
    """Replace every block linear's weight with its nearest scaled isometry; return what changed:
    the matrices, the spread of their normalized singular values afterwards, and for BitLinears the
    share of ternary codes that flipped and the mean change of the absmean scale."""
    targets = fire_targets(model)
    if not targets:
        raise ValueError("the model has no block linears for FIRE to replace")
    flipped = codes = 0
    scale_ratio: list[float] = []
    spread_lo, spread_hi = math.inf, 0.0
    for _, module in targets:
        w = module.weight
        new = nearest_isometry(w, mode, iterations)
        if isinstance(module, BitLinear):
            before = ternary_codes(w.float(), ternary_scale(w.float()))
            after = ternary_codes(new.float(), ternary_scale(new.float()))
            flipped += int((before != after).sum())
            codes += before.numel()
            scale_ratio.append(float(ternary_scale(new.float()) / ternary_scale(w.float())))
        w.copy_(new)
        sv = torch.linalg.svdvals(new.float()) / math.sqrt(w.shape[0] / w.shape[1])
        spread_lo, spread_hi = min(spread_lo, float(sv.min())), max(spread_hi, float(sv.max()))
    return {"mode": mode, "iterations": iterations if mode == "newton_schulz" else None,
            "matrices": len(targets), "normalized_singular_values": [spread_lo, spread_hi],
            "ternary_codes_flipped": flipped / codes if codes else None,
            "ternary_scale_ratio": sum(scale_ratio) / len(scale_ratio) if scale_ratio else None}


def fire_at_switch(cfg, model: nn.Module, log=print, **_) -> dict:
    """Trainer event `stage_switch` (with `fire.at_<stage>`): FIRE on the parent's weights; its report."""
    f = cfg.fire
    report = apply_fire(model, f.mode, f.iterations)
    flipped = report["ternary_codes_flipped"]
    log(f"FIRE ({f.mode}) on {report['matrices']} matrices"
        + (f": {100 * flipped:.1f}% of the ternary codes flipped" if flipped is not None else ""))
    return {"fire": report}
