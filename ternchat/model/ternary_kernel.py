"""The 2-bit ternary decoding kernel: C++ (model/csrc/ternary_mm.cpp), built on first use.

`torch.ops.ternchat.ternary_mm(x_int8, packed, n)` multiplies int8 activations by ternary codes stored at
2 bits each (four per byte, in the kernel's group-of-64 layout, `pack`) with int32 accumulation; with
AVX512-VNNI it never widens the weights in memory. The extension is compiled by PyTorch's
cpp_extension with the machine's own instruction set (`-march=native`) into PyTorch's extension cache,
once per machine and PyTorch version; it needs a C++ compiler (scripts/setup.sh installs g++) and ninja.
"""

from __future__ import annotations

from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "ternary_mm.cpp"
GROUP = 64
_loaded = False


def load() -> None:
    """Build (first time) and load the op; idempotent."""
    global _loaded
    if _loaded:
        return
    from torch.utils import cpp_extension

    cpp_extension.load(name="ternchat_ternary_mm", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                       is_python_module=False, verbose=False)

    @torch.library.register_fake("ternchat::ternary_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n), dtype=torch.int32)

    _loaded = True


def vectorized() -> bool:
    """Whether the loaded kernel is the AVX512-VNNI one (else the portable loop)."""
    load()
    return bool(torch.ops.ternchat.ternary_mm_vectorized())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(n, K) codes in {-1, 0, 1}, K a multiple of 64 -> (n, K / 4) uint8 in the kernel's layout: byte j of
    group g holds code + 1 of inputs 64g + j, + 16, + 32 and + 48 in bits 0-1, 2-3, 4-5 and 6-7."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"the 2-bit kernel needs input dimensions that are multiples of {GROUP}; this one is {k}")
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8).view(n, k // GROUP, 4, 16)
    packed = shifted[:, :, 0] | (shifted[:, :, 1] << 2) | (shifted[:, :, 2] << 4) | (shifted[:, :, 3] << 6)
    return packed.reshape(n, k // 4).contiguous()
