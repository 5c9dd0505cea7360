"""Tolerances that follow from the dtype and the length of the reduction, so that a comparison holds on
every CPU kernel path (MKL's or OpenBLAS's blocking, ATen's vectorised or generic kernels, any thread count).

A floating-point sum of n terms, computed in any order, is within gamma_n * sum |terms| of the exact sum,
with gamma_n = n u / (1 - n u) and u the unit roundoff, half the machine epsilon (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 3.1). Two kernels that sum the same terms in different
orders are therefore within 2 gamma_n sum |terms| of each other. Exact equality is kept only where the
arithmetic is exact by construction; each such test says why.
"""

from __future__ import annotations

import torch


def gamma(n: int, dtype: torch.dtype) -> float:
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def matmul_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound on the difference of two float evaluations of `a @ b` that sum in different orders."""
    exact_abs = a.detach().double().abs() @ b.detach().double().abs()
    return (2 * gamma(a.shape[-1], dtype or a.dtype) * exact_abs).to(a.dtype)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str = "") -> None:
    """|actual - expected| <= bound everywhere; the message gives the worst excess."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    excess = diff - (bound.double() if isinstance(bound, torch.Tensor) else bound)
    assert (excess <= 0).all(), (f"{what}: {int((excess > 0).sum())} of {diff.numel()} values past the bound "
                                 f"(worst difference {float(diff.max()):.3g}, worst excess {float(excess.max()):.3g})")
