"""BitLinear's exact int8 training forward (model.ternary_gemm = "int8"): the integer product is exact, the
outputs and losses follow the float path within float rounding, and the gradients are the float path's."""

from __future__ import annotations

import pytest
import torch

from ternchat.config import ConfigError, load_config
from ternchat.model.bitlinear import (BitLinear, ExactInt8Product, int8_product_fits, set_training_gemm,
                                      ternary_codes, ternary_scale)
from ternchat.model.gpt import GPT, GPTShape

from numerics import assert_within, matmul_bound  # tests/numerics.py

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths

SHAPE = GPTShape(vocab_size=256, depth=2, d_model=64, n_heads=2, d_ff=128, seq_len=32, quant="ternary")


def test_the_integer_product_is_exact_and_scaled_once():
    torch.manual_seed(0)
    x, w = torch.randn(48, 96) * 3, torch.randn(40, 96) * 0.02
    y = ExactInt8Product.apply(x, w, torch.float32)
    scale = 127.0 / x.abs().amax(-1, keepdim=True)
    x_int = (x * scale).round().clamp(-128, 127)
    beta = ternary_scale(w)
    codes = ternary_codes(w, beta)
    exact = (x_int.double() @ codes.double().t()) * (beta.double() / scale.double())
    assert torch.equal(torch._int_mm(x_int.to(torch.int8), codes.to(torch.int8).t()).double(),
                       x_int.double() @ codes.double().t())  # exact: int8 products, int32 sums far below 2^31
    # one fp32 rounding of beta / scale and one of the product: within 2 fp32 ulps of the exact value
    assert_within(y, exact.float(), 2 * torch.finfo(torch.float32).eps * exact.abs().float(), "y")


def test_outputs_follow_the_float_path_and_gradients_are_its_own():
    torch.manual_seed(0)
    layer = BitLinear(96, 40)
    x = torch.randn(3, 16, 96, requires_grad=True)
    upstream = torch.randn(3, 16, 40)
    results = []
    for int8 in (False, True):
        layer.int8_forward = int8
        layer.weight.grad = x.grad = None
        y = layer(x)
        (y * upstream).sum().backward()
        results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
    (y_float, dx_float, dw_float), (y_int8, dx_int8, dw_int8) = results
    with torch.no_grad():  # the float path sums 96 products of the dequantized operands in fp32
        scale = 127.0 / x.abs().amax(-1, keepdim=True)
        x_q = (x * scale).round().clamp(-128, 127) / scale
        w_q = ternary_codes(layer.weight, ternary_scale(layer.weight)) * ternary_scale(layer.weight)
        bound = matmul_bound(x_q.reshape(-1, 96), w_q.t()).view_as(y_float)
    assert_within(y_int8, y_float, bound + 2 * torch.finfo(torch.float32).eps * y_float.abs(), "y")
    assert torch.equal(dx_int8, dx_float) and torch.equal(dw_int8, dw_float)  # exact: the same backward ops


def fp8_and_exact_gradients(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """A BitLinear's (dX, dW) with the FP8 input gradient and with the exact one, in fp64 from its codes."""
    torch.manual_seed(0)
    layer = BitLinear(256, 96).to(device)
    x = torch.randn(64, 256, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(64, 96, device=device, dtype=dtype) * torch.logspace(-3, 1, 64, device=device)[:, None]
    set_training_gemm(layer, "int8_fp8_dx")
    with torch.autocast(device, torch.bfloat16, enabled=dtype == torch.bfloat16):
        (layer(x) * upstream).sum().backward()
    dx, dw = x.grad.clone(), layer.weight.grad.clone()
    set_training_gemm(layer, "int8")
    x.grad = layer.weight.grad = None
    with torch.autocast(device, torch.bfloat16, enabled=dtype == torch.bfloat16):
        (layer(x) * upstream).sum().backward()
    beta = ternary_scale(layer.weight.float())
    w_q = ternary_codes(layer.weight.float(), beta).double() * beta.double()
    return dx, dw, layer.weight.grad, upstream, w_q


def test_the_fp8_input_gradient_rounds_only_the_output_gradient():
    dx, dw, dw_int8, upstream, w_q = fp8_and_exact_gradients(torch.float32)
    assert torch.equal(dw, dw_int8)  # dW keeps the output gradient's own dtype
    exact = upstream.double() @ w_q
    # E4M3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself, one below 2^-6 of its row's
    # scale (a subnormal) within 2^-10 of that scale; the codes are exact, and fp32 sums 96 products
    scale = upstream.abs().amax(-1, keepdim=True).double() / 448
    rounding = torch.maximum(upstream.abs().double() * 2.0 ** -4, scale * 2.0 ** -10)
    bound = rounding @ w_q.abs() + matmul_bound(upstream.double(), w_q).double()
    assert_within(dx.double(), exact, bound, "dX")
    assert not torch.allclose(dx.double(), exact, rtol=1e-6, atol=0)  # the FP8 rounding ran
    # one scale per row: rows whose gradients are a thousand times smaller keep their relative accuracy
    relative = (dx.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 2.0 ** -4


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
def test_on_fp8_tensor_cores_the_input_gradient_is_the_emulated_one():
    dx, _, _, upstream, w_q = fp8_and_exact_gradients(torch.bfloat16, "cuda")
    assert dx.dtype == torch.bfloat16
    exact = upstream.double() @ w_q
    relative = (dx.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 2.0 ** -4 + 2.0 ** -8  # FP8's rounding of dY, then bf16's of the result


def train_losses(gemm: str, compiled: bool = False, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = set_training_gemm(GPT(SHAPE), gemm)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = forward(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_few_training_steps_match_the_float_path():
    int8, floats = train_losses("int8"), train_losses("float")
    assert int8 != floats  # the integer path ran: other roundings
    # the products differ by float rounding, and an activation within rounding of an 8-bit step can move
    # one code: the mean loss stays within 1e-4
    assert int8 == pytest.approx(floats, rel=1e-4)


def test_a_few_training_steps_with_the_fp8_input_gradient_follow_the_exact_one():
    fp8, int8 = train_losses("int8_fp8_dx"), train_losses("int8")
    assert fp8 != int8
    # the first loss is the forward's alone; the later ones follow updates whose input gradients differ by
    # FP8's rounding (within 2^-4 relative) and stay within 1% of the exact gradient's
    assert fp8[0] == int8[0] and fp8 == pytest.approx(int8, rel=1e-2)


@pytest.mark.inductor
@pytest.mark.parametrize("gemm", ["int8", "int8_fp8_dx"])
def test_the_int8_product_compiles(gemm):
    assert train_losses(gemm, compiled=True) == pytest.approx(train_losses(gemm), rel=1e-4)


def test_int8_needs_ternary_weights_and_no_gemm_hooks():
    assert load_config(overrides=["model.ternary_gemm=int8"]).model.ternary_gemm == "int8"
    with pytest.raises(ConfigError, match="needs model.quant = 'ternary'"):
        load_config(overrides=["model.ternary_gemm=int8", "model.quant=none"])
    with pytest.raises(ConfigError, match="does not combine with fp4.recipe or collider.enabled"):
        load_config(overrides=["model.ternary_gemm=int8", "fp4.recipe=fp8"])
    with pytest.raises(ConfigError, match="needs model.quant = 'ternary'"):
        load_config(overrides=["model.ternary_gemm=int8_fp8_dx", "model.quant=none"])


def test_bench_train_times_the_int8_forward_next_to_the_float_one():
    from ternchat.bench.train_bench import build_variant

    cfg = load_config(overrides=["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=32"])
    products = {name: {m.int8_forward for m in build_variant(name, cfg, 512, torch.device("cpu")).model.modules()
                       if isinstance(m, BitLinear)} for name in ("c_compiled", "c_int8")}
    assert products == {"c_compiled": {False}, "c_int8": {True}}


def logits_by_product(device: str) -> dict[str, torch.Tensor]:
    """A GPT's logits in fp32 with the float product (the reference) and under bf16 autocast with each product
    (weights jiggled: the output projections start at zero, which would leave the blocks out of the logits)."""
    shape = GPTShape(vocab_size=1024, depth=4, d_model=256, n_heads=4, d_ff=1024, seq_len=128, quant="ternary")
    torch.manual_seed(0)
    model = GPT(shape).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 1024, (8, 128), device=device)
    with torch.no_grad():
        logits = {"fp32": model(idx).float()}
        for gemm in ("float", "int8"):
            set_training_gemm(model, gemm)
            with torch.autocast(device, torch.bfloat16):
                logits[gemm] = model(idx).float()
    return logits


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (int8 tensor cores)"))])
def test_under_bf16_autocast_the_int8_product_is_as_accurate_as_the_bf16_path(device):
    logits = logits_by_product(device)
    x = torch.randn(8 * 128, 256, device=device, dtype=torch.bfloat16)
    assert int8_product_fits(x, 1024)  # the training shapes take the integer path
    reference = logits["fp32"]
    error = {gemm: float((logits[gemm] - reference).norm() / reference.norm()) for gemm in ("float", "int8")}
    assert not torch.equal(logits["int8"], logits["float"])  # the integer path ran
    # Neither path matches the fp32 model exactly: bf16 rounds the other ops, and a difference within
    # rounding can move an 8-bit activation code by one step in the next layer. The int8 product skips the
    # float path's rounding of both operands to bf16, so its error is the float path's or less (the margin
    # covers which codes happen to move).
    assert error["int8"] <= 1.5 * error["float"], error
