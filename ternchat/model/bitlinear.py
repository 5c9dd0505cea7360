"""BitLinear b1.58: ternary weights, 8-bit activations, straight-through estimator.

BitNet b1.58 (Ma et al. 2024, arXiv:2402.17764) and Microsoft's "training tips" code: the latent
weight W is kept in full precision; every forward quantizes it per tensor to {-1, 0, +1} * beta
with beta = mean|W| (absmean, recomputed each forward), and quantizes the input per token to
8 bits with the absmax scale 127 / max|x|. Rounding has no gradient, so the backward pass uses
the straight-through estimator: `x + (q(x) - x).detach()` passes the gradient of q(x) to x as
if q were the identity. The product of the quantized operands runs through model/linear.py's GEMMs,
where an `[fp4]` recipe or Collider can change them. The layer expects a normalized input (the GPT
puts an RMSNorm in front of every BitLinear), has no bias, and also offers the packed form used by
export and inference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternchat.model.fp4 import E4M3_MAX, has_fp8_tensor_cores
from ternchat.model.linear import NO_HOOKS, Gemm, Linear, linear

EPS = 1e-5


def ternary_scale(w: torch.Tensor) -> torch.Tensor:
    """beta = mean|W|, the per-tensor absmean scale."""
    return w.abs().mean().clamp(min=EPS)


def ternary_codes(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """round(W / beta) clipped to {-1, 0, +1}, in W's dtype."""
    return (w / beta).round().clamp(-1, 1)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """The ternary weight {-beta, 0, +beta} that the forward pass uses."""
    beta = ternary_scale(w)
    return ternary_codes(w, beta) * beta


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) symmetric 8-bit absmax fake quantization."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127) / scale


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `x` as int8 codes (rows, in) and their per-row scales 127 / max|x| (rows, 1), in fp32:
    `quantize_activation(x)` is codes / scale."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = 127.0 / rows.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (rows * scale).round().clamp(-128, 127).to(torch.int8), scale


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value exactly `quantized`, gradient of the identity with respect to `x`."""
    return quantized.detach() + (x - x.detach())


def fp8_input_gradient(dy: torch.Tensor, codes: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """dX = dY W_q for W_q = codes * beta, with dY in FP8 E4M3 under one scale per row (amax / 448) and the
    codes in E4M3, where -1, 0 and +1 are exact, so that dY's rounding is the only one before the fp32
    accumulation. On FP8 tensor cores (CUDA sm_89+, bf16 gradients, sizes multiples of 16) `torch._scaled_mm`
    multiplies them with row scales for dY and beta for the codes; elsewhere the same FP8 values are
    multiplied in fp32. Returns dY's dtype."""
    out_features = dy.shape[1]
    row_scale = (dy.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    dy8 = (dy.float() / row_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    in_features = codes.shape[1]
    if (has_fp8_tensor_cores(dy.device) and dy.dtype == torch.bfloat16
            and out_features % 16 == 0 and in_features % 16 == 0):
        codes8 = codes.float().to(torch.float8_e4m3fn).t().contiguous().t()  # (out, in), column-major
        beta_per_column = beta.float().expand(1, in_features).contiguous()
        return torch._scaled_mm(dy8, codes8, scale_a=row_scale, scale_b=beta_per_column, out_dtype=dy.dtype)
    return ((dy8.float() * row_scale) @ codes.float() * beta).to(dy.dtype)


class ExactInt8Product(torch.autograd.Function):
    """BitLinear's training product on integer tensor cores: y = (x_int8 @ codes^T) * (beta / s_x).

    Both operands are exact int8 values (8-bit activation codes, ternary weight codes), so
    `torch._int_mm` multiplies them with int32 accumulation, which is exact at these widths (|sum| <=
    128 * K < 2^31), and the two scales are applied once per output afterwards. The float path instead
    rounds the dequantized operands to the autocast dtype before multiplying. The backward is the
    straight-through estimator's, as on the float path: dX = dY W_q and dW = dY^T X_q with the dequantized
    operands in dY's dtype; with `fp8_dx`, dX takes FP8 instead (`fp8_input_gradient`: W_q is exact there,
    only dY is rounded) while dW keeps dY's dtype. It saves the int8 codes, not the float operands."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, fp8_dx: bool = False) -> torch.Tensor:
        x_int, scale = activation_codes(x.detach())
        beta = ternary_scale(w.detach().float())
        codes = ternary_codes(w.detach().float(), beta).to(torch.int8)
        y = torch._int_mm(x_int, codes.t()).float() * (beta / scale)  # codes.t(): (in, out), column-major
        ctx.save_for_backward(x_int, scale, codes, beta)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype, ctx.fp8_dx = x.shape, x.dtype, w.dtype, fp8_dx
        return y.view(*x.shape[:-1], codes.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x_int, scale, codes, beta = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        x_q = (x_int.float() / scale).to(dy.dtype)
        if ctx.fp8_dx:
            dx = fp8_input_gradient(dy, codes, beta)
        else:
            dx = dy @ (codes.float() * beta).to(dy.dtype)
        dw = (dy.t() @ x_q).to(ctx.w_dtype)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dw, None, None


def int8_product_fits(x: torch.Tensor, out_features: int) -> bool:
    """Whether `torch._int_mm` takes this product: on CUDA it needs more than 16 rows and sizes that are
    multiples of 8 (cuBLASLt's int8 layouts), and compute capability 8.0 or newer."""
    if x.device.type != "cuda":
        return True
    rows = x.numel() // x.shape[-1]
    return (rows > 16 and rows % 8 == 0 and x.shape[-1] % 8 == 0 and out_features % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


class BitLinear(nn.Linear):
    """A bias-free linear whose forward uses ternary weights and 8-bit activations. With `int8_forward`
    (and no GEMM hooks) the product runs as exact integers (`ExactInt8Product`), and with `fp8_input_grad`
    as well its input gradient takes FP8."""

    def __init__(self, in_features: int, out_features: int, gemm: Gemm = NO_HOOKS):
        super().__init__(in_features, out_features, bias=False)
        self.gemm = gemm
        self.int8_forward = False
        self.fp8_input_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.int8_forward and not self.gemm.hooked and int8_product_fits(x, self.out_features):
            autocast = torch.is_autocast_enabled(x.device.type)
            out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            return ExactInt8Product.apply(x, w, out_dtype, self.fp8_input_grad)
        # Quantize in fp32 even under autocast, so the ternary grid does not depend on the dtype; the
        # rounding has no gradient, so it is computed outside autograd and joined by the STE.
        with torch.no_grad():
            x_quant = quantize_activation(x.float()).to(x.dtype)
            w_quant = quantize_weight(w.float()).to(w.dtype)
        return linear(ste(x, x_quant), ste(w, w_quant), self.gemm)


class TernaryLinear(nn.Module):
    """Inference form of BitLinear: fixed int8 codes in {-1, 0, +1} and the scale beta.

    Four kernels compute it. `float` (the default) multiplies the dequantized activations by the dequantized
    weight, exactly as BitLinear's forward does, so its output equals BitLinear's bit for bit. `dense` is the
    same product with the weight dequantized once and kept (4 bytes per weight): the same output bit for bit,
    and the fastest for a batch of rows on a CPU, whose float GEMM grows sublinearly with the rows where the
    integer kernels below grow linearly (`ternchat bench batched`). The decoding
    kernels multiply the activations' int8 values by the codes with exact int32 accumulation, then apply one
    float scale per token, beta / activation scale, and never materialize a float weight: `int8` with the
    codes as an int8 matrix (torch._int_mm), `int2` with the codes packed 2 bits each and read by the C++
    kernel of model/ternary_kernel.py (built on first use). They differ from `float` by float rounding only.
    """

    KERNELS = ("float", "dense", "int8", "int2")

    def __init__(self, codes: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("beta", beta.detach().float().reshape(()))
        self.kernel = "float"
        self._codes_by_column: torch.Tensor | None = None  # (in, out) for the int8 GEMM, made by set_kernel
        self._packed: torch.Tensor | None = None  # 2-bit codes for the int2 kernel, made by set_kernel
        self._weight: torch.Tensor | None = None  # the dequantized weight of the dense kernel, made by set_kernel

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        w = layer.weight.detach().float()
        beta = ternary_scale(w)
        return cls(ternary_codes(w, beta), beta)

    def weight_values(self) -> torch.Tensor:
        return self.codes.float() * self.beta

    def prepare(self, kernel: str) -> None:
        """Switch to `kernel`, making the weight layout it reads (and dropping a dense kernel's weight)."""
        self._weight = self.weight_values() if kernel == "dense" else None
        if kernel == "int8":
            self._codes_by_column = self.codes.t().contiguous()
        elif kernel == "int2":
            from ternchat.model import ternary_kernel

            if self.codes.device.type != "cpu":
                raise ValueError("the int2 kernel runs on the CPU; use int8 or float on a GPU")
            ternary_kernel.load()
            self._packed = ternary_kernel.pack(self.codes.cpu()).to(self.codes.device)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in ("float", "dense"):
            x_q = quantize_activation(x.float()).to(x.dtype)
            weight = self._weight if self._weight is not None else self.weight_values()
            return F.linear(x_q, weight.to(x.dtype))
        x_int, scale = activation_codes(x)
        if self.kernel == "int8":
            products = torch._int_mm(x_int, self._codes_by_column)
        else:
            products = torch.ops.ternchat.ternary_mm(x_int, self._packed, self.out_features)
        y = products.float() * (self.beta / scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def as_ternary(module: nn.Module) -> TernaryLinear | None:
    """The inference form of a ternary layer (a BitLinear's codes and scale, or the TernaryLinear itself);
    None for any other module."""
    if isinstance(module, BitLinear):
        return TernaryLinear.from_bitlinear(module)
    return module if isinstance(module, TernaryLinear) else None


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Choose the kernel of every TernaryLinear in `model` ("float", "dense", "int8" or "int2"); returns the model."""
    if kernel not in TernaryLinear.KERNELS:
        raise ValueError(f"unknown ternary kernel {kernel!r}; choose one of {', '.join(TernaryLinear.KERNELS)}")
    for module in model.modules():
        if isinstance(module, TernaryLinear):
            module.prepare(kernel)
    return model


def to_inference(model: nn.Module) -> nn.Module:
    """Replace every BitLinear in `model` (in place) by its TernaryLinear; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, BitLinear):
            setattr(model, name, TernaryLinear.from_bitlinear(child))
        else:
            to_inference(child)
    return model


TRAINING_GEMMS = ("float", "int8", "int8_fp8_dx")


def set_training_gemm(model: nn.Module, gemm: str) -> nn.Module:
    """Choose the products of every BitLinear in `model`: "float" (dequantized operands), "int8" (the exact
    integer forward, `ExactInt8Product`) or "int8_fp8_dx" (that, and the input gradient in FP8); layers with
    GEMM hooks keep theirs. Returns the model."""
    if gemm not in TRAINING_GEMMS:
        raise ValueError(f"unknown training GEMM {gemm!r}; choose one of {', '.join(TRAINING_GEMMS)}")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.int8_forward = gemm != "float"
            module.fp8_input_grad = gemm == "int8_fp8_dx"
    return model


def make_linear(in_features: int, out_features: int, quant: str, gemm: Gemm = NO_HOOKS) -> nn.Linear:
    """The layer factory's switch: ternary BitLinear, or a dense bias-free baseline; `gemm` holds the
    GEMM hooks (an FP4/FP8 recipe, Collider's row filter) of model/linear.py."""
    if quant == "ternary":
        return BitLinear(in_features, out_features, gemm)
    if quant == "none":
        return Linear(in_features, out_features, gemm)
    raise ValueError(f"unknown quantization {quant!r}; choose 'ternary' or 'none'")
