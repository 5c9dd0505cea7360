"""Blockwise 8-bit optimizer state: linear symmetric int8 with one fp32 absmax scale per block.

As in "Effective Quantization of Muon Optimizer States" (arXiv:2509.23106) and 8-bit optimizers
(Dettmers et al. 2022): a state tensor is flattened and cut into blocks of `block_size` values;
each block stores q = round(x * 127 / max|x_block|) as int8 plus its absmax as fp32, so it costs
1 + 4 / block_size bytes per value. Stochastic rounding (round up with probability equal to the
fractional part) makes the quantization unbiased on average.
"""

from __future__ import annotations

import torch


def seeded_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a tuple of ints: the same parts give the same stream in any process."""
    return torch.Generator(device=device).manual_seed(hash(tuple(parts)) & ((1 << 62) - 1))


def quantize_blockwise(x: torch.Tensor, block_size: int, stochastic: bool = False,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes with x's shape, fp32 absmax per block)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (127.0 / absmax.clamp(min=1e-12)).unsqueeze(1)
    if stochastic:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        scaled = torch.floor(scaled + noise)
    else:
        scaled = scaled.round()
    codes = scaled.clamp(-127, 127).to(torch.int8).view(-1)[:flat.numel()].view(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    values = blocks * (absmax / 127.0).unsqueeze(1)
    return values.view(-1)[:flat.numel()].view(codes.shape)


class StateCodec:
    """Keeps a named optimizer-state tensor in fp32, or blockwise int8 when `bits == 8`.

    Stochastic-rounding noise comes from a generator seeded by (seed, step, slot), so a resumed run
    draws exactly the same noise without storing generator state.
    """

    def __init__(self, bits: int = 32, block_size: int = 2048, stochastic: bool = False, seed: int = 0):
        if bits not in (8, 32):
            raise ValueError(f"state bits must be 8 or 32, got {bits}")
        self.bits, self.block_size, self.stochastic, self.seed = bits, block_size, stochastic, seed

    def load(self, state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
        """The state tensor as fp32 (zeros the first time); for fp32 state this is the stored tensor itself."""
        if self.bits == 32:
            if key not in state:
                state[key] = torch.zeros_like(like, dtype=torch.float32)
            return state[key]
        if key + "_q" not in state:
            return torch.zeros_like(like, dtype=torch.float32)
        return dequantize_blockwise(state[key + "_q"], state[key + "_absmax"], self.block_size)

    def store(self, state: dict, key: str, value: torch.Tensor, step: int, slot: int) -> None:
        if self.bits == 32:
            if state.get(key) is not value:
                state[key] = value
            return
        generator = None
        if self.stochastic:
            generator = seeded_generator(self.seed, step, slot, device=value.device)
        state[key + "_q"], state[key + "_absmax"] = quantize_blockwise(value, self.block_size, self.stochastic,
                                                                       generator)

    def drop(self, state: dict, key: str) -> None:
        for name in (key, key + "_q", key + "_absmax"):
            state.pop(name, None)
