"""The linear layer's own GEMMs: unchanged values when off, FP4/FP8 formats and recipes, Collider."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ternchat.config import ConfigError, load_config
from ternchat.model.bitlinear import BitLinear, quantize_activation, quantize_weight, ste
from ternchat.model.collider import Collider
from ternchat.model.fp4 import (GemmRecipe, GemmSize, Quantizer, SizeRule, fp8_gemm, has_fp8_tensor_cores,
                                linear_gemms, make_recipe, quantize_mxfp4, quantize_nvfp4, quantize_nvfp4_2d,
                                random_hadamard, round_e2m1, rule_from_timings, time_fp8_gemms, to_fp8)
from ternchat.model.gpt import GPT, MLP, GPTShape, rms_norm
from ternchat.model.linear import Gemm, Linear, RowFilter, linear

from numerics import assert_within, gamma, matmul_bound  # tests/numerics.py

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- with nothing on, values as before


@pytest.mark.parametrize("autocast", [False, True])
def test_the_linears_own_gemms_with_idle_hooks_give_f_linears_values_and_gradients_bit_for_bit(autocast):
    torch.manual_seed(0)
    x = torch.randn(3, 40, 96, requires_grad=True)
    upstream = torch.randn(3, 40, 80)
    idle = Gemm(rows=RowFilter())  # a row filter with nothing filtered: the own autograd function runs
    dense, bit = Linear(96, 80, idle), BitLinear(96, 80, idle)
    assert type(dense(x).grad_fn).__name__ == "_LinearGemmsBackward"
    assert type(Linear(96, 80)(x).grad_fn).__name__ != "_LinearGemmsBackward"  # no hooks: F.linear itself
    results = []
    for layer in (dense, bit):
        for use_own in (False, True):
            x.grad = layer.weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if isinstance(layer, BitLinear):
                    if use_own:
                        y = layer(x)
                    else:  # the layer before it had its own GEMMs
                        with torch.no_grad():
                            xq = quantize_activation(x.float()).to(x.dtype)
                            wq = quantize_weight(layer.weight.float()).to(layer.weight.dtype)
                        y = F.linear(ste(x, xq), ste(layer.weight, wq))
                else:
                    y = layer(x) if use_own else F.linear(x, layer.weight)
            (y.float() * upstream).sum().backward()
            results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
    for old, new in ((results[0], results[1]), (results[2], results[3])):
        for a, b in zip(old, new):
            assert a.dtype == b.dtype and torch.equal(a, b)  # exact: with no hook the own GEMMs are F.linear's


def test_a_model_with_nothing_on_has_no_hooks():
    model = GPT(GPTShape(512, 2, 64, 2, 256, 32, "ternary"))
    gemms = [m.gemm for m in model.modules() if hasattr(m, "gemm")]
    assert len(gemms) == 2 * 6 + 1 and all(g.quantizer is None and g.rows is None for g in gemms)
    assert model.collider is None


# ---------------------------------------------------------------- formats


# Quantizers below are compared exactly: they use elementwise +, *, / (IEEE-rounded, the same bits on every
# kernel path), rounding and max, and no reductions that a kernel could reorder.
def test_e2m1_rounds_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 2.6, 7.0, 100.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 3.0, 6.0, 6.0])
    assert torch.equal(round_e2m1(x), want)
    assert torch.equal(round_e2m1(-x), -want)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(round_e2m1(grid), grid)  # representable values stay


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_is_not():
    g = torch.Generator().manual_seed(0)
    for value in (0.3, 1.1, 2.2, 4.9):
        x = torch.full((200_000,), value)
        draws = round_e2m1(x, stochastic=True, generator=g)
        lo, hi = draws.min().item(), draws.max().item()
        p = (value - lo) / (hi - lo)
        sigma = (hi - lo) * (p * (1 - p) / x.numel()) ** 0.5
        assert abs(draws.mean().item() - value) < 3 * sigma
        assert abs(round_e2m1(x).mean().item() - value) > 10 * sigma  # nearest rounding is biased here
    # MXFP4 with the 3/4 pre-scale: unbiased for whole blocks, the block maximum included
    x = torch.randn(4, 64) * 3
    mean = torch.stack([quantize_mxfp4(x, stochastic=True, generator=g) for _ in range(3000)]).mean(0)
    assert (mean - x).abs().max() < 0.15 and (quantize_mxfp4(x) - x).abs().mean() > 2 * (mean - x).abs().mean()


def test_nvfp4_2d_weight_quantization_commutes_with_transposition():
    w = torch.randn(80, 96) * torch.logspace(-2, 1, 96)
    assert torch.equal(quantize_nvfp4_2d(w).T, quantize_nvfp4_2d(w.T))
    assert not torch.equal(quantize_nvfp4(w).T, quantize_nvfp4(w.T))  # 1x16 blocks do not commute
    for quantizer in (quantize_nvfp4, quantize_mxfp4):  # a transposed view (the weight-gradient operands)
        assert torch.equal(quantizer(w.T), quantizer(w.T.contiguous()))


def test_ternary_weights_are_exact_in_nvfp4():
    w = quantize_weight(torch.randn(64, 96))
    assert torch.equal(quantize_nvfp4_2d(w), w)
    assert torch.equal(quantize_nvfp4(w), w)


def test_random_hadamard_leaves_the_product_unchanged_and_spreads_outliers():
    torch.manual_seed(0)
    a, b = torch.randn(24, 100), torch.randn(40, 100)  # 100: padded to the block
    signs = torch.randint(0, 2, (16,)).float() * 2 - 1
    # each side is a float sum of 112 products (padded), the rotated one after 16-term rotations of both
    # operands; by Cauchy-Schwarz every sum of |terms| is at most |a_i| |b_j|
    bound = 2 * (gamma(112, torch.float32) + 2 * gamma(16, torch.float32)) * a.norm(dim=1)[:, None] * b.norm(dim=1)
    assert_within(random_hadamard(a, signs) @ random_hadamard(b, signs).T, a @ b.T, bound, "rotated product")
    spike = torch.zeros(1, 16)
    spike[0, 3] = 1.0
    assert torch.allclose(random_hadamard(spike, signs).abs(), torch.full((1, 16), 0.25))
    # through the quantizer with the transform but no formats: the plain weight gradient
    q = Quantizer(make_recipe("nvfp4"), seed=1)
    dy, x = torch.randn(50, 32), torch.randn(50, 48)
    transformed = q.gemm(dy.t().contiguous(), x.t().contiguous(), GemmRecipe(hadamard=16))
    assert torch.allclose(transformed, dy.t() @ x, atol=1e-5)


def test_fp8_scaled_mm_and_its_emulation_multiply_the_same_fp8_values():
    torch.manual_seed(0)
    a, b = torch.randn(32, 72), torch.randn(48, 72)  # 72: _scaled_mm's operands get padded to 80
    recipe = make_recipe("fp8")
    emulated = Quantizer(recipe, 0).gemm(a, b, recipe.input_grad)  # no FP8 tensor cores here
    a8, sa = to_fp8(a, "e5m2")
    b8, sb = to_fp8(b, "e4m3")
    assert torch.equal(emulated, (a8.float() * sa) @ (b8.float() * sb).T)  # exact: the emulation's own formula
    real = fp8_gemm(a, b, recipe.input_grad, torch.float32, real=True)  # torch._scaled_mm, as on a GPU
    assert torch.allclose(real, emulated, rtol=1e-5, atol=1e-5)
    assert (real - a @ b.T).abs().max() < 0.1 * (a @ b.T).abs().max()


def _torchao():
    try:
        from torchao.prototype.mx_formats import kernels, mx_tensor, nvfp4_tensor
    except ImportError as e:  # the set-up script's test extras install it
        pytest.fail(f"torchao is needed for the reference check: {e}")
    return kernels, mx_tensor, nvfp4_tensor


def test_quantizers_match_torchaos_reference_casts():
    kernels, mx_tensor, nvfp4_tensor = _torchao()
    torch.manual_seed(0)
    x = torch.randn(16, 128) * torch.logspace(-3, 2, 128)
    v = torch.linspace(-7, 7, 2001)
    assert torch.equal(round_e2m1(v), kernels.f4_unpacked_to_f32(kernels.f32_to_f4_unpacked(v)))
    scale, data = mx_tensor.to_mx(x.contiguous(), torch.float4_e2m1fn_x2, 32)
    ao_mx = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data.view(torch.uint8))).view(16, 4, 32) \
        * mx_tensor.get_fp_scale(scale).view(16, 4, 1)
    assert torch.equal(quantize_mxfp4(x), ao_mx.view(16, 128))
    tensor_scale = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    block_scale, data = nvfp4_tensor.nvfp4_quantize(x.contiguous(), 16, tensor_scale)
    ao_nv = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data)).view(16, 8, 16) \
        * (tensor_scale * block_scale.float()).view(16, 8, 1)
    assert torch.equal(quantize_nvfp4(x), ao_nv.view(16, 128))


# ---------------------------------------------------------------- recipes in a model


@pytest.mark.parametrize("recipe", ["mxfp4_backward", "nvfp4", "fp8"])
def test_each_recipe_trains_a_model_from_config(recipe):
    cfg = load_config(overrides=["model.depth=3", "model.d_model=64", "model.n_heads=2", "model.seq_len=32",
                                 f"fp4.recipe={recipe}", "fp4.quantize_head=true"])
    torch.manual_seed(0)
    model = GPT(GPTShape.from_config(cfg, 256))
    hooks = [m.gemm.quantizer for m in model.modules() if hasattr(m, "gemm")]
    assert hooks[-1] is not None and sum(h is None for h in hooks) == 6  # the last block stays high precision
    idx = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.statistical  # compares whole runs or sampled distributions: the numerics pass leaves it out
def test_mxfp4_backward_gradients_are_unbiased_through_the_whole_model():
    """Tseng et al.'s point: stochastic rounding (with the 3/4 pre-scale) and the RHT leave every backward
    GEMM unbiased, so the mean of many quantized gradients approaches the exact one."""
    sets = ["model.depth=3", "model.d_model=64", "model.n_heads=2", "model.seq_len=32", "fp4.bf16_last_blocks=0"]
    torch.manual_seed(0)
    model = GPT(GPTShape.from_config(load_config(overrides=[*sets, "fp4.recipe=mxfp4_backward"]), 256))
    for p in model.parameters():
        nn.init.normal_(p, std=0.05) if p.dim() == 2 else None
    plain = GPT(GPTShape.from_config(load_config(overrides=sets), 256))
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (4, 32))
    plain(idx, idx.roll(-1, 1)).backward()
    exact = plain.blocks[0].mlp.up.weight.grad
    draws = []
    for _ in range(120):
        model.zero_grad()
        model(idx, idx.roll(-1, 1)).backward()
        draws.append(model.blocks[0].mlp.up.weight.grad.clone())
    error = lambda g: ((g - exact).norm() / exact.norm()).item()
    single, mean = error(draws[0]), error(torch.stack(draws).mean(0))
    # an unbiased estimate's mean of n draws errs by ~ single / sqrt(n); a bias would stop it there
    assert single > 0.1 and mean < 2 * single / len(draws) ** 0.5


# ---------------------------------------------------------------- FP8's size rule


def test_the_fp8_size_is_the_smallest_at_or_above_which_fp8_won_every_measured_gemm():
    small, middle, large = GemmSize("forward", 8, 8, 8), GemmSize("forward", 16, 16, 16), GemmSize("forward", 32, 32, 32)
    assert rule_from_timings([(small, 1.0, 0.5), (middle, 1.0, 0.5), (large, 1.0, 0.5)]) == 0
    assert rule_from_timings([(small, 1.0, 2.0), (middle, 1.0, 0.5), (large, 1.0, 0.5)]) == small.macs + 1
    # a loss above a win moves the size above the loss: no measured GEMM runs in FP8 where it lost
    assert rule_from_timings([(small, 1.0, 0.5), (middle, 1.0, 1.0), (large, 1.0, 0.5)]) == middle.macs + 1
    assert rule_from_timings([(small, 1.0, 0.5), (large, 1.0, 3.0)]) == math.inf
    gemms = linear_gemms(out_features=256, in_features=64, rows=128)
    assert [(g.m, g.n, g.k) for g in gemms] == [(128, 256, 64), (128, 64, 256), (256, 64, 128)]


def test_gemms_below_the_fp8_size_are_f_linears_bit_for_bit_and_those_above_run_in_fp8():
    torch.manual_seed(0)
    size = 10 ** 6  # between the 64 x 64 linear's GEMMs (128 x 64 x 64 = 524,288) and the 64 -> 256 one's
    gemm = Gemm(Quantizer(make_recipe("fp8"), 0, fp8_min_macs=size))
    x = torch.randn(2, 64, 64, requires_grad=True)  # 128 rows
    for out_features, in_fp8 in ((64, False), (256, True)):
        layer = Linear(64, out_features, gemm)
        assert all(gemm.quantizer.takes(r, g.m, g.n, g.k) == in_fp8 for g, r in zip(
            linear_gemms(out_features, 64, 128), (gemm.quantizer.recipe.forward, gemm.quantizer.recipe.input_grad,
                                                  gemm.quantizer.recipe.weight_grad)))
        upstream = torch.randn(2, 64, out_features)
        results = []
        for y_of in (lambda: layer(x), lambda: F.linear(x, layer.weight)):
            x.grad = layer.weight.grad = None
            y = y_of()
            (y * upstream).sum().backward()
            results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
        recipe = gemm.quantizer.recipe
        expected_y = fp8_gemm(x.detach().reshape(-1, 64), layer.weight.detach(), recipe.forward, torch.float32, False)
        for own, plain in zip(*results):
            assert torch.equal(own, plain) != in_fp8
        if in_fp8:
            assert torch.equal(results[0][0].reshape(-1, out_features), expected_y)


def test_a_model_whose_gemms_are_all_below_the_fp8_size_trains_as_without_the_recipe():
    sets = ["model.depth=3", "model.d_model=64", "model.n_heads=2", "model.seq_len=32"]
    torch.manual_seed(0)
    plain = GPT(GPTShape.from_config(load_config(overrides=sets), 256))
    results = []
    for extra in ([], ["fp4.recipe=fp8", f"fp4.fp8_min_macs={10 ** 12}"], ["fp4.recipe=fp8", "fp4.fp8_min_macs=0"]):
        model = GPT(GPTShape.from_config(load_config(overrides=[*sets, *extra]), 256))
        model.load_state_dict(plain.state_dict())
        for p in model.parameters():
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel())) if p.dim() == 2 else None
        idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_plain, grads_plain), (loss_above, grads_above), (loss_fp8, grads_fp8) = results
    assert torch.equal(loss_plain, loss_above)
    assert all(torch.equal(grads_plain[n], grads_above[n]) for n in grads_plain)
    assert not torch.equal(loss_plain, loss_fp8)  # with size 0 every GEMM of the first two blocks is FP8


def test_the_fp8_size_rule_is_fitted_at_start_and_printed():
    sets = ["model.depth=3", "model.d_model=64", "model.n_heads=2", "model.seq_len=32"]
    cpu = torch.device("cpu")
    notes = GPT(GPTShape.from_config(load_config(overrides=[*sets, "fp4.recipe=fp8"]), 256)).fit_gemms(
        cpu, 128, torch.float32)
    assert notes[0].startswith("GEMMs: fp8: emulated on CPU")
    assert notes[1] == "fp8 size rule (FP8 emulated here, so every GEMM): every GEMM in FP8"
    notes = GPT(GPTShape.from_config(load_config(overrides=[*sets, "fp4.recipe=fp8", "fp4.fp8_min_macs=5000000"]),
                                     256)).fit_gemms(cpu, 128, torch.float32)
    assert notes[1] == "fp8 size rule (set by fp4.fp8_min_macs): FP8 for GEMMs of at least 5,000,000 multiply-adds"
    notes = GPT(GPTShape.from_config(load_config(overrides=[*sets, "fp4.recipe=nvfp4"]), 256)).fit_gemms(
        cpu, 128, torch.float32)
    assert len(notes) == 1 and "size rule" not in notes[0]


def test_the_size_rule_measures_every_distinct_gemm_and_keeps_fp8_only_where_it_won():
    """The measurement itself, run here on the emulation (the real one needs FP8 tensor cores)."""
    gemms = linear_gemms(128, 64, 256) + linear_gemms(128, 64, 256) + linear_gemms(64, 64, 256)
    timings = time_fp8_gemms(gemms, make_recipe("fp8"), torch.device("cpu"), torch.float32, real=False)
    assert [g for g, _, _ in timings] == list(dict.fromkeys(gemms)) and len(timings) == 6
    assert all(plain > 0 and fp8 > 0 for _, plain, fp8 in timings)
    size = rule_from_timings(timings)
    assert all(fp8 < plain for g, plain, fp8 in timings if g.macs >= size)
    rule = SizeRule(size, "here", timings, counts=collections.Counter(gemms))
    assert rule.speedup() >= 1  # never slower than the compute dtype alone, at the measured GEMMs
    everything = SizeRule(0, "here", timings, counts=collections.Counter(gemms))
    slower = sum(n * plain for g, n in collections.Counter(gemms).items() for h, plain, _ in timings if h == g)
    assert everything.speedup() == pytest.approx(slower / sum(
        n * fp8 for g, n in collections.Counter(gemms).items() for h, _, fp8 in timings if h == g))


def test_bench_gemm_fits_the_size_rule_to_every_presets_model():
    """On a GPU `ternchat bench gemm` times these GEMMs; here the presets' models must build (on the meta
    device) and reach the rule, which the emulation answers with every GEMM."""
    from ternchat.bench.gemm_bench import PRESET_SHAPES, preset_fp8_rules

    rows = preset_fp8_rules(torch.device("cpu"))
    assert [r["preset"] for r in rows] == list(PRESET_SHAPES)
    assert all(r["lines"] == ["fp8 size rule (FP8 emulated here, so every GEMM): every GEMM in FP8"] for r in rows)
    assert rows[1]["rows"] == 4 * 4096  # preset A: batch 4 x 4,096 tokens


@pytest.mark.skipif(not (torch.cuda.is_available() and has_fp8_tensor_cores(torch.device("cuda"))),
                    reason="needs FP8 tensor cores (CUDA sm_89+)")
def test_on_fp8_tensor_cores_the_size_rule_is_measured_for_the_models_gemms():
    cuda = torch.device("cuda")
    cfg = load_config(overrides=["model.depth=3", "model.d_model=768", "model.n_heads=6", "model.seq_len=512",
                                 "fp4.recipe=fp8", "fp4.bf16_last_blocks=0"])
    model = GPT(GPTShape.from_config(cfg, 8192)).to(cuda)
    notes = model.fit_gemms(cuda, 4096, torch.bfloat16)
    rule = next(m.gemm.quantizer for m in model.modules() if getattr(getattr(m, "gemm", None), "quantizer", None)).rule
    assert notes[1].startswith("fp8 size rule (measured at start on")
    assert len(rule.timings) == len({g for g, _, _ in rule.timings}) >= 3
    assert all(fp8 < plain for g, plain, fp8 in rule.timings if g.macs >= rule.min_macs)
    idx = torch.randint(0, 8192, (8, 512), device=cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)


def test_fp4_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="fp4.recipe"):
        load_config(overrides=["fp4.recipe=int4"])
    with pytest.raises(ConfigError, match="bf16_last_blocks"):
        load_config(overrides=["model.depth=2", "fp4.recipe=nvfp4", "fp4.bf16_last_blocks=2"])
    with pytest.raises(ConfigError, match="hadamard_block"):
        load_config(overrides=["fp4.recipe=nvfp4", "fp4.hadamard_block=24"])
    with pytest.raises(ConfigError, match="collider"):
        load_config(overrides=["collider.enabled=true", "mtp.kind=modules"])
    with pytest.raises(ConfigError, match="fp4.fp8_min_macs = 1000 .* set fp4.recipe = 'fp8'"):
        load_config(overrides=["fp4.recipe=nvfp4", "fp4.fp8_min_macs=1000"])
    with pytest.raises(ConfigError, match="fp4.fp8_min_macs"):
        load_config(overrides=["fp4.recipe=fp8", "fp4.fp8_min_macs=-2"])


# ---------------------------------------------------------------- Collider


def test_the_gathered_weight_gradient_equals_the_zero_row_gemm():
    torch.manual_seed(0)
    rows = RowFilter()
    rows.kept, rows.total = torch.randperm(256)[:150].sort().values, 256
    x = torch.randn(256, 96, requires_grad=True)
    w = torch.randn(80, 96, requires_grad=True)
    upstream = torch.randn(256, 80)
    linear(x, w, Gemm(rows=rows)).mul(upstream).sum().backward()
    mask = torch.zeros(256, 1)
    mask[rows.kept] = 1
    x0, w0 = x.detach().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(x0, w0).mul(upstream * mask).sum().backward()
    # the gathered GEMM sums the 150 kept rows, the zero-row GEMM all 256 (zeros included), in orders that
    # depend on the kernel path: equal within the float bound of a 256-term sum
    assert_within(w.grad, w0.grad, matmul_bound((upstream * mask).T, x), "dW")
    assert_within(x.grad, x0.grad, matmul_bound(upstream * mask, w), "dX")
    assert (x.grad[mask[:, 0] == 0] == 0).all()  # exact: the filtered rows' gradients are never computed


class _MLPOnly(nn.Module):
    """Embedding, two pre-norm MLP blocks and a head: tokens never mix."""

    def __init__(self, rows: RowFilter | None):
        super().__init__()
        shape = GPTShape(64, 2, 32, 2, 128, 16, "ternary")
        gemm = Gemm(rows=rows)
        self.embed = nn.Embedding(64, 32)
        self.norms = nn.ModuleList(rms_norm(32) for _ in range(2))
        self.mlps = nn.ModuleList(MLP(shape, gemm) for _ in range(2))
        self.head = Linear(32, 64, gemm)
        for mlp in self.mlps:
            nn.init.normal_(mlp.down.weight, std=0.1)

    def per_token_loss(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, 64), idx.roll(-1, 1).reshape(-1), reduction="none")


def test_collider_on_an_mlp_only_model_gives_the_masked_loss_gradients():
    torch.manual_seed(0)
    collider = Collider(0.4)
    model = _MLPOnly(collider.rows)
    reference = _MLPOnly(None)
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (4, 16))
    collider.loss(model.per_token_loss(idx), idx, idx).backward()
    assert collider.rows.kept.numel() == 64 - 26
    mask = torch.zeros(64)
    mask[collider.rows.kept] = 1
    (reference.per_token_loss(idx) * mask).sum().div(mask.sum()).backward()
    ours, want = _grads(model), _grads(reference)
    assert ours.keys() == want.keys()
    # the weight gradients sum over the 64 token rows in another order (38 kept rows against 64 with zeros):
    # within twice the float bound of a 64-term sum, relative to each gradient's scale
    tol = 2 * gamma(64, torch.float32)
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=tol, atol=tol * float(want[name].abs().max()),
                                   msg=name)


def test_collider_with_attention_equals_zeroing_filtered_rows_at_every_layer():
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=32",
                                 "collider.enabled=true", "collider.filter_frac=0.5"])
    model = GPT(GPTShape.from_config(cfg, 128))
    for p in model.parameters():  # the silent residual branches of the init would hide attention's mixing
        nn.init.normal_(p, std=0.1) if p.dim() == 2 else None
    reference = GPT(GPTShape.from_config(load_config(overrides=["model.depth=2", "model.d_model=64",
                                                                "model.n_heads=2", "model.seq_len=32"]), 128))
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 128, (2, 32))
    model(idx, idx.roll(-1, 1)).backward()
    kept = model.collider.rows.kept
    keep = torch.zeros(64, dtype=torch.bool)
    keep[kept] = True

    def zero_filtered_rows(module, inputs, output):
        output.register_hook(lambda g: g * keep.view(*g.shape[:-1], 1).to(g.dtype))

    for m in reference.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(zero_filtered_rows)
    logits = reference(idx)
    per_token = F.cross_entropy(logits.view(-1, 128), idx.roll(-1, 1).reshape(-1), reduction="none")
    (per_token * keep).sum().div(keep.sum()).backward()
    ours, want = _grads(model), _grads(reference)
    tol = 2 * gamma(idx.numel(), torch.float32)  # as above: the rows' sums in another order
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=tol, atol=tol * float(want[name].abs().max()),
                                   msg=name)
    # and it differs from the masked-loss gradient: attention carries gradient through filtered tokens
    masked = GPT(reference.shape)
    masked.load_state_dict(model.state_dict())
    logits = masked(idx)
    per_token = F.cross_entropy(logits.view(-1, 128), idx.roll(-1, 1).reshape(-1), reduction="none")
    (per_token * keep).sum().div(keep.sum()).backward()
    assert not torch.allclose(masked.blocks[0].attn.k_proj.weight.grad, ours["blocks.0.attn.k_proj.weight"])


def test_collider_keeps_the_highest_scores_and_the_excess_loss_subtracts_the_reference():
    collider = Collider(0.5)
    loss = torch.tensor([0.1, 3.0, 0.2, 2.0, 5.0, 0.0])
    assert collider.loss(loss, None, None).item() == pytest.approx(10 / 3)
    assert collider.rows.kept.tolist() == [1, 3, 4]
    collider.reference_run = "unused"
    collider.reference_loss = lambda idx, targets: torch.tensor([0.0, 2.9, 0.0, 0.0, 5.0, 0.0])
    collider.loss(loss, None, None)
    assert collider.rows.kept.tolist() == [0, 2, 3]  # excess 0.1, 0.1 (first of the ties), 0.2, 2.0


def test_a_stale_row_filter_is_refused_and_evaluation_ignores_collider():
    cfg = load_config(overrides=["model.depth=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16",
                                 "collider.enabled=true"])
    model = GPT(GPTShape.from_config(cfg, 64))
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(idx, idx)
    plain = F.cross_entropy(model(idx).view(-1, 64), idx.reshape(-1))
    assert torch.allclose(full, plain)
    model.collider.rows.kept, model.collider.rows.total = torch.arange(3), 7
    with pytest.raises(RuntimeError, match="row filter"):
        model.lm_head(torch.randn(2, 16, 32, requires_grad=True)).sum().backward()


def test_a_run_with_fp4_and_collider_resumes_exactly(tmp_path, overrides, stop_and_resume):
    from ternchat.runs import load_model_and_tokenizer
    from ternchat.train.trainer import train

    cfg = load_config(overrides=[*overrides, "fp4.recipe=mxfp4_backward", "fp4.bf16_last_blocks=0",
                                 "collider.enabled=true", "train.max_steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    first = stop_and_resume(cfg, run, 4)
    assert all("collider_all_tokens_loss" in r for r in first if "loss" in r)
    model, _ = load_model_and_tokenizer(run)
    assert model.shape.precision is None and model.collider is None  # inference runs without the hooks
    # Rho-1's excess loss against that run as the reference model
    excess = load_config(overrides=[*overrides, "collider.enabled=true", f"collider.reference={json.dumps(str(run))}",
                                    "train.max_steps=2"])
    train(excess, tmp_path / "excess", log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "excess" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "collider_all_tokens_loss" in r]) == 2
