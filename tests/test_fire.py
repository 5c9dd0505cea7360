"""FIRE: the nearest scaled isometry of each block matrix (exact polar factor, or the official code's
Newton-Schulz), and what it does to a BitLinear's ternary codes."""

import math

import pytest
import torch

from ternchat.config import load_config
from ternchat.model.gpt import GPT, GPTShape
from ternchat.train.fire import apply_fire, fire_targets, nearest_isometry

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
def test_exact_mode_gives_singular_values_sqrt_dout_over_din(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.linspace(0.01, 3.0, shape[1])  # badly conditioned
    q = nearest_isometry(w, "exact")
    sv = torch.linalg.svdvals(q)
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(shape[0] / shape[1])), atol=1e-3)


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_exact_mode_is_the_polar_factor(shape):
    """Against W (W^T W)^{-1/2} (tall) or (W W^T)^{-1/2} W (wide), from an eigendecomposition in float64."""
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.float64)
    if shape[0] >= shape[1]:
        evals, evecs = torch.linalg.eigh(w.T @ w)
        polar = w @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    else:
        evals, evecs = torch.linalg.eigh(w @ w.T)
        polar = evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ w
    got = nearest_isometry(w.float(), "exact").double() / math.sqrt(shape[0] / shape[1])
    assert torch.allclose(got, polar, atol=1e-4)


def test_five_newton_schulz_steps_are_far_from_an_isometry_and_many_converge():
    torch.manual_seed(2)
    w = torch.randn(128, 128)
    sv5 = torch.linalg.svdvals(nearest_isometry(w, "newton_schulz", 5))
    sv60 = torch.linalg.svdvals(nearest_isometry(w, "newton_schulz", 60))
    assert sv5.min() < 0.5  # the official setting leaves small singular values small
    assert torch.allclose(sv60, torch.ones_like(sv60), atol=1e-3)


def test_apply_fire_replaces_block_matrices_only_and_reports_code_flips():
    cfg = load_config(overrides=["model.depth=2", "model.d_model=64", "model.n_heads=2", "mtp.kind=modules"])
    model = GPT(GPTShape.from_config(cfg, 512))
    head, embed = model.lm_head.weight.clone(), model.embed.weight.clone()
    targets = fire_targets(model)
    assert {n.split(".")[-1] for n, _ in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "up", "down"}
    assert any(n.startswith("mtp.blocks.") for n, _ in targets)
    report = apply_fire(model, "exact")
    lo, hi = report["normalized_singular_values"]
    assert report["matrices"] == len(targets) and 1 - 1e-3 < lo <= hi < 1 + 1e-3
    assert 0 < report["ternary_codes_flipped"] < 1
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.embed.weight, embed)  # exact: untouched
    with pytest.raises(ValueError, match="mode"):
        nearest_isometry(torch.eye(3), "quintic")
