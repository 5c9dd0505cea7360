"""The linear layer's three GEMMs, written out so that a recipe can quantize them and Collider shrink them.

`linear(x, w, gemm)` is F.linear(x, w) with its own autograd function: forward Y = X W^T, backward
dX = dY W and dW = dY^T X, on the flattened rows of X. With its hooks present but idle it computes
exactly what F.linear's autograd computes (tested bit for bit, under autocast too); with no hook at all
it calls F.linear, so a model without the features below runs PyTorch's own backward (a Python-level
backward hands FSDP2's gloo reductions gradients that carry Python objects, and gloo's worker threads
then need the GIL when they drop them). Two hooks live in `Gemm`:
- `quantizer` (model/fp4.py): each GEMM's operands quantized as the `[fp4]` recipe says;
- `rows` (model/collider.py): when set, the rows (tokens) whose gradients flow. The backward then
  treats every other row of dY as zero, as Collider does: dX is computed for the kept rows only and is
  zero elsewhere, and dW = dY[kept]^T X[kept] runs as a smaller dense GEMM over the gathered rows.
The layer factory (`make_linear` in model/bitlinear.py) hands every block linear and the head a `Gemm`;
the training loop knows none of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternchat.model.fp4 import Quantizer


def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU that supports bf16, or a CPU with
    oneDNN's bf16 path (AVX512-BF16 or AMX). Elsewhere (many AMD CPUs, older Intel ones) a bf16 product
    is emulated, several times slower than the same product in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class RowFilter:
    """The rows whose gradients flow in the next backward pass, shared by all the linears of a model:
    `kept` holds flat row indices into the `total` (batch x time) rows, or None for all rows."""

    def __init__(self) -> None:
        self.kept: torch.Tensor | None = None
        self.total = 0


@dataclass
class Gemm:
    """A linear's hooks: its quantizer (None = full precision) and the model's row filter (None = off)."""

    quantizer: Quantizer | None = None
    rows: RowFilter | None = None

    @property
    def hooked(self) -> bool:
        return self.quantizer is not None or self.rows is not None


NO_HOOKS = Gemm()


class _LinearGemms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, gemm: Gemm) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)  # w may be a parameter in a higher precision than x: cast where used
        ctx.gemm = gemm
        w = w.to(x.dtype)
        q, rows = gemm.quantizer, x.numel() // x.shape[-1]
        if q is None or not q.takes(q.recipe.forward, rows, w.shape[0], w.shape[1]):
            return F.linear(x, w)
        y = q.gemm(x.reshape(-1, x.shape[-1]), w, q.recipe.forward)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w = weight.to(x.dtype)
        gemm: Gemm = ctx.gemm
        q = gemm.quantizer
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        kept = gemm.rows.kept if gemm.rows is not None else None
        if kept is not None:
            if dy2.shape[0] != gemm.rows.total:
                raise RuntimeError(f"Collider's row filter was set for {gemm.rows.total} rows but this linear has "
                                   f"{dy2.shape[0]}: the filter belongs to another batch")
            dy2, x2 = dy2.index_select(0, kept), x2.index_select(0, kept)
        dx = dw = None
        rows, (n_out, n_in) = dy2.shape[0], w.shape
        if ctx.needs_input_grad[0]:  # the same mm calls as F.linear's own backward
            plain = q is None or not q.takes(q.recipe.input_grad, rows, n_in, n_out)
            dx_rows = dy2.mm(w) if plain else q.gemm(dy2, w.t(), q.recipe.input_grad)
            if kept is not None:
                dx_rows = dy2.new_zeros(gemm.rows.total, x.shape[-1]).index_copy_(0, kept, dx_rows)
            dx = dx_rows.view(x.shape)
        if ctx.needs_input_grad[1]:
            plain = q is None or not q.takes(q.recipe.weight_grad, n_out, n_in, rows)
            dw = x2.t().mm(dy2).t() if plain else q.gemm(dy2.t(), x2.t(), q.recipe.weight_grad)
            dw = dw.to(weight.dtype)
        return dx, dw, None


def linear(x: torch.Tensor, w: torch.Tensor, gemm: Gemm = NO_HOOKS) -> torch.Tensor:
    """F.linear(x, w) through the layer's own three GEMMs (no bias). Under autocast the GEMMs run in its
    dtype: the input is cast as autocast would, and so is a computed weight (BitLinear's quantized one),
    whose low-precision copy is what backward keeps; a parameter is kept as it is and cast where a GEMM
    uses it, so a weight used several times in one forward (a looped model's head) is not kept once per
    use, and the values and gradients stay autocast's, bit for bit. With no hook set it is F.linear
    itself: PyTorch's own backward, nothing added."""
    if not gemm.hooked:
        return F.linear(x, w)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearGemms.apply(x.to(dtype), w if w.is_leaf else w.to(dtype), gemm)
    return _LinearGemms.apply(x, w, gemm)


class Linear(nn.Linear):
    """The dense bias-free linear, its GEMMs run by `linear` with the hooks in `gemm`."""

    def __init__(self, in_features: int, out_features: int, gemm: Gemm = NO_HOOKS):
        super().__init__(in_features, out_features, bias=False)
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.gemm)

