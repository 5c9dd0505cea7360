"""Low-precision GEMM recipes for the linear layer's three GEMMs: FP4 (MXFP4, NVFP4) and FP8.

Every GEMM here is written out = A @ B^T with the reduction dimension last in both operands:
forward Y = X W^T (A = X, B = W), input gradient dX = dY W (A = dY, B = W^T), weight gradient
dW = dY^T X (A = dY^T, B = X^T). A recipe says, per GEMM, how each operand is quantized.

Formats. E2M1 holds {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign; round-to-nearest sends ties to the even
code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4), as the hardware does, and saturates at 6.
Stochastic rounding picks the upper neighbour with probability (v - lo) / (hi - lo), so its mean is v.
MXFP4 (OCP MX v1.0): 32 elements along the reduction dimension share an E8M0 scale
2^(floor(log2 amax) - 2). NVFP4 (NVIDIA, arXiv 2509.25149): 16 elements share an E4M3 scale, times an
fp32 tensor scale amax / (448 x 6); weights use 16x16 2D blocks, so W and W^T quantize to the same
values and the forward and input-gradient GEMMs see one weight. Quantization here is emulated: operands
are rounded to the format's values and multiplied in the compute dtype (on Blackwell the same values
would feed an FP4 tensor-core GEMM).

Recipes (`[fp4] recipe`):
- `mxfp4_backward`, Tseng et al. (arXiv 2502.20586, amazon-science/mxfp4-llm): the forward is left as
  it is; both backward GEMMs are MXFP4 with stochastic rounding after a 3/4 pre-scale (so the block
  maximum, below 8 after the power-of-two scale, is not clipped at 6, which would bias the rounding),
  undone after the rounding; before quantizing, a blockwise random Hadamard transform (block 64 in the
  official code, signs redrawn at every GEMM) multiplies both operands along the reduction dimension.
  A (S) (B S)^T = A B^T because S is orthogonal, so only the quantization sees it.
- `nvfp4`, NVIDIA's recipe: all three GEMMs NVFP4; activations and weights round to nearest, gradients
  (dY) stochastically; a 16x16 random Hadamard transform on the weight-gradient GEMM's operands only,
  with one seeded sign vector; the last blocks (`bf16_last_blocks`) stay in high precision.
- `fp8`: the nearest real low precision on Hopper (sm_90) and Ada: tensorwise current scaling, E4M3 for
  activations and weights, E5M2 for gradients, GEMMs by `torch._scaled_mm` on FP8 tensor cores (CUDA
  sm_89+), emulated elsewhere.

FP8's size rule. Each FP8 GEMM pays for two amax reductions and two casts, which cost more than the
faster product saves on small matrices (torchao's float8 training skips linears below sizes its H100
benchmarks found; `ternchat bench gemm` found FP8 faster only on the presets' large shapes). So on FP8
tensor cores the recipe measures, once at start on the device it trains on, every distinct GEMM of the
model at its micro-batch's rows: the bf16 product against the FP8 one with its casts and reductions
included (eager; median of CUDA-event timings). The rule is a size in multiply-adds (M x N x K): a GEMM
runs in FP8 when it is at least that large, and the size is the smallest for which FP8 won at every
measured GEMM as large or larger, so no measured GEMM runs in FP8 where it lost. `[fp4] fp8_min_macs`
sets the size instead (0 = every GEMM). Where FP8 is emulated, speed is not what the recipe is for, and
every GEMM takes it unless a size is set.

For a ternary BitLinear the weight operand {-beta, 0, +beta} is exact in NVFP4 (every non-zero block
has amax beta, so its E4M3 scale is exactly 448 and the codes are +-6) and in tensorwise FP8, so there
FP4 changes the activations (already 8-bit) and the gradients. MXFP4's power-of-two scale cannot hold
beta: beta / scale lies in [4, 8) and rounds to 4 or 6.
"""

from __future__ import annotations

import collections
import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny
E5M2_MAX = 57344.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RECIPES = ("mxfp4_backward", "nvfp4", "fp8")
HADAMARD_BLOCK = {"mxfp4_backward": 64, "nvfp4": 16, "fp8": 0}  # the recipes' own sizes; 0 = none


@functools.lru_cache(maxsize=None)
def _grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1's non-negative values and the round-to-nearest thresholds between them, made once per device.
    A tie goes to the neighbour with an even code (0, 1, 2, 4): the midpoints whose upper neighbour is even
    are nudged down one ulp so that the tie lands above."""
    grid = torch.tensor(E2M1_VALUES, device=device)
    mid = (grid[1:] + grid[:-1]) / 2
    upper_even = torch.tensor([False, True, False, True, False, True, False], device=device)
    return grid, torch.where(upper_even, torch.nextafter(mid, torch.zeros_like(mid)), mid)


def round_e2m1(v: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """`v` (already divided by its scale, fp32) rounded to E2M1 values, saturating at +-6: to nearest with
    ties to even, or stochastically (unbiased inside [-6, 6])."""
    grid, thresholds = _grid(v.device)
    a = v.abs().clamp(max=E2M1_MAX).contiguous()
    if stochastic:
        lo_index = (torch.bucketize(a, grid, right=True) - 1).clamp(max=len(E2M1_VALUES) - 2)
        lo, hi = grid[lo_index], grid[lo_index + 1]
        up = torch.rand(a.shape, device=a.device, generator=generator) < (a - lo) / (hi - lo)
        q = torch.where(up, hi, lo)
    else:
        q = grid[torch.bucketize(a, thresholds)]
    return q.copysign(v)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """`x` (..., K) in fp32, zero-padded to a multiple of `block` and viewed (..., K / block, block)."""
    k = x.shape[-1]
    pad = -k % block
    x = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    return x.reshape(*x.shape[:-1], -1, block), k  # reshape: an operand may be a transposed view


def _unblock(q: torch.Tensor, k: int) -> torch.Tensor:
    return q.flatten(-2)[..., :k]


def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """The E8M0 block scale 2^(floor(log2 amax) - 2) of OCP MXFP4 (E2M1's largest power of two is 4)."""
    exponent = torch.frexp(amax)[1] - 1 - 2  # frexp: amax = m 2^e with m in [0.5, 1)
    return torch.ldexp(torch.ones_like(amax), exponent.clamp(-127, 127))


def quantize_mxfp4(x: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None,
                   block: int = 32) -> torch.Tensor:
    """MXFP4 along the last dimension, returned dequantized in fp32. Stochastic rounding takes Tseng et
    al.'s 3/4 pre-scale, so no value clips."""
    blocks, k = _blocks(x, block)
    scale = mx_scale(blocks.abs().amax(-1, keepdim=True))
    v = blocks / scale
    if stochastic:
        q = round_e2m1(v * 0.75, stochastic=True, generator=generator) / 0.75
    else:
        q = round_e2m1(v)
    return _unblock(q * scale, k)


def nvfp4_scales(block_amax: torch.Tensor, tensor_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's two levels: the fp32 tensor scale amax / (448 x 6) and each block's E4M3 scale (as fp32)."""
    tensor_scale = tensor_amax.float() / (E4M3_MAX * E2M1_MAX)
    block_scale = (block_amax / E2M1_MAX / tensor_scale).clamp(E4M3_TINY, E4M3_MAX)
    return tensor_scale, block_scale.to(torch.float8_e4m3fn).float()


def _nvfp4_round(blocks: torch.Tensor, block_amax: torch.Tensor, stochastic: bool,
                 generator: torch.Generator | None) -> torch.Tensor:
    # A zero tensor gets a tiny scale instead of a branch (no device sync): its values stay 0.
    tensor_scale, block_scale = nvfp4_scales(block_amax, block_amax.amax().clamp(min=1e-30))
    v = (blocks * ((1.0 / tensor_scale) / block_scale)).clamp(-E2M1_MAX, E2M1_MAX)
    return round_e2m1(v, stochastic, generator) * (tensor_scale * block_scale)


def quantize_nvfp4(x: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """NVFP4 in 1x16 blocks along the last dimension, returned dequantized in fp32."""
    blocks, k = _blocks(x, 16)
    q = _nvfp4_round(blocks, blocks.abs().amax(-1, keepdim=True), stochastic, generator)
    return _unblock(q, k)


def quantize_nvfp4_2d(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 in 16x16 blocks of a matrix (round to nearest), dequantized in fp32; commutes with .T."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, -cols % 16, 0, -rows % 16))
    tiles = padded.view(padded.shape[0] // 16, 16, padded.shape[1] // 16, 16)
    q = _nvfp4_round(tiles, tiles.abs().amax(dim=(1, 3), keepdim=True), False, None)
    return q.view(padded.shape)[:rows, :cols]


def hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_hadamard(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Blockwise random Hadamard transform of `x` (..., K) along its last dimension: each block of
    len(signs) elements times S = diag(signs) H. K is zero-padded to a multiple of the block, and the
    padding stays (zeros in both operands add nothing to their product)."""
    block = signs.numel()
    pad = -x.shape[-1] % block
    x = torch.nn.functional.pad(x, (0, pad)) if pad else x
    s = signs[:, None].to(x.dtype) * hadamard_matrix(block, x.device).to(x.dtype)
    return (x.reshape(*x.shape[:-1], -1, block) @ s).flatten(-2)


@dataclass(frozen=True)
class Operand:
    """How one GEMM operand is quantized: format (`mxfp4`, `nvfp4`, `nvfp4_2d`, `e4m3`, `e5m2`, or None for
    left as is) and whether its rounding is stochastic."""

    format: str | None = None
    stochastic: bool = False


@dataclass(frozen=True)
class GemmRecipe:
    """One GEMM's operand treatment, and the random Hadamard block along its reduction dimension (0 =
    none)."""

    a: Operand = Operand()
    b: Operand = Operand()
    hadamard: int = 0

    @property
    def quantized(self) -> bool:
        return self.a.format is not None or self.b.format is not None


@dataclass(frozen=True)
class Recipe:
    name: str
    forward: GemmRecipe
    input_grad: GemmRecipe
    weight_grad: GemmRecipe
    fresh_signs: bool  # redraw the Hadamard signs at every GEMM (Tseng et al.) or keep one seeded vector


def make_recipe(name: str, hadamard_block: int = 0) -> Recipe:
    """The recipe called `name`; `hadamard_block` 0 takes the recipe's own block size."""
    if name not in RECIPES:
        raise ValueError(f"unknown FP4 recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    h = hadamard_block or HADAMARD_BLOCK[name]
    if name == "mxfp4_backward":
        grad, other = Operand("mxfp4", True), Operand("mxfp4", True)
        return Recipe(name, GemmRecipe(), GemmRecipe(grad, other, h), GemmRecipe(grad, other, h), True)
    if name == "nvfp4":
        weight, act, grad = Operand("nvfp4_2d"), Operand("nvfp4"), Operand("nvfp4", True)
        return Recipe(name, GemmRecipe(act, weight), GemmRecipe(grad, weight), GemmRecipe(grad, act, h), False)
    act, weight, grad = Operand("e4m3"), Operand("e4m3"), Operand("e5m2")
    return Recipe(name, GemmRecipe(act, weight), GemmRecipe(grad, weight), GemmRecipe(grad, act), False)


def quantize(x: torch.Tensor, op: Operand, generator: torch.Generator | None = None) -> torch.Tensor:
    """Operand `x` (..., K) fake-quantized along its last dimension as `op` says, in fp32."""
    if op.format == "mxfp4":
        return quantize_mxfp4(x, op.stochastic, generator)
    if op.format == "nvfp4":
        return quantize_nvfp4(x, op.stochastic, generator)
    if op.format == "nvfp4_2d":
        return quantize_nvfp4_2d(x)
    if op.format in ("e4m3", "e5m2"):
        data, scale = to_fp8(x, op.format)
        return data.float() * scale
    raise ValueError(f"unknown operand format {op.format!r}")


def to_fp8(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise current scaling: (x / s cast to FP8, s) with s = amax / the format's largest value."""
    dtype, top = (torch.float8_e4m3fn, E4M3_MAX) if fmt == "e4m3" else (torch.float8_e5m2, E5M2_MAX)
    scale = (x.detach().abs().amax().float() / top).clamp(min=1e-12)
    return (x.float() / scale).clamp(-top, top).to(dtype), scale


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, g: GemmRecipe, out_dtype: torch.dtype, real: bool) -> torch.Tensor:
    """A @ B^T with both operands in FP8: through `torch._scaled_mm` (`real`: FP8 tensor cores on CUDA
    sm_89+), or emulated with the same FP8 values multiplied in `out_dtype` (PyTorch's CPU `_scaled_mm` is a
    naive kernel, hundreds of times slower than this)."""
    a8, sa = to_fp8(a, g.a.format)
    b8, sb = to_fp8(b, g.b.format)
    if not real:
        return ((a8.float() * sa).to(out_dtype)) @ (b8.float() * sb).to(out_dtype).t()
    k = a.shape[-1]
    pad = -k % 16  # _scaled_mm wants the reduction dimension a multiple of 16
    if pad:
        a8 = torch.nn.functional.pad(a8.float(), (0, pad)).to(a8.dtype)
        b8 = torch.nn.functional.pad(b8.float(), (0, pad)).to(b8.dtype)
    return torch._scaled_mm(a8.contiguous(), b8.contiguous().t(), sa, sb, out_dtype=out_dtype)


@dataclass(frozen=True)
class GemmSize:
    """One GEMM of a linear layer, A (m, k) @ B (n, k)^T: which of the three (`forward`, `input grad`,
    `weight grad`) and its sizes."""
    role: str
    m: int
    n: int
    k: int

    @property
    def macs(self) -> int:
        return self.m * self.n * self.k


def linear_gemms(out_features: int, in_features: int, rows: int) -> list[GemmSize]:
    """The three GEMMs of a linear (out_features x in_features) on `rows` rows: Y = X W^T, dX = dY W and
    dW = dY^T X, each as A @ B^T with the reduction dimension last."""
    return [GemmSize("forward", rows, out_features, in_features),
            GemmSize("input grad", rows, in_features, out_features),
            GemmSize("weight grad", out_features, in_features, rows)]


@dataclass
class SizeRule:
    """FP8 for GEMMs of at least `min_macs` multiply-adds (math.inf: none); `how` says where the size came
    from, and `timings` holds the measured GEMMs as (GEMM, seconds in the compute dtype, seconds in FP8)."""
    min_macs: float = 0
    how: str = "every GEMM"
    timings: list[tuple[GemmSize, float, float]] = field(default_factory=list)
    plain: str = "bf16"  # the compute dtype the timings compare FP8 against
    counts: dict[GemmSize, int] = field(default_factory=dict)  # how often the model runs each measured GEMM

    def applies(self, m: int, n: int, k: int) -> bool:
        return m * n * k >= self.min_macs

    def speedup(self) -> float:
        """The measured time of all the model's GEMMs under the recipe in the compute dtype over their time
        under this rule (each GEMM as often as the model runs it)."""
        if not self.timings:
            return math.nan  # nothing measured
        plain = sum(self.counts.get(g, 1) * t for g, t, _ in self.timings)
        ruled = sum(self.counts.get(g, 1) * (fp8 if self.applies(g.m, g.n, g.k) else t) for g, t, fp8 in self.timings)
        return plain / ruled

    def lines(self) -> list[str]:
        if math.isinf(self.min_macs):
            head = f"fp8 size rule ({self.how}): no GEMM in FP8"
        elif self.min_macs == 0:
            head = f"fp8 size rule ({self.how}): every GEMM in FP8"
        else:
            head = f"fp8 size rule ({self.how}): FP8 for GEMMs of at least {int(self.min_macs):,} multiply-adds"
        if self.timings:
            head += f"; the model's GEMMs {self.speedup():.2f}x as fast as in {self.plain} alone"
        rows = [f"  {g.role} {g.m} x {g.n} x {g.k}: {self.plain} {plain * 1e6:,.0f} us, FP8 with casts "
                f"{fp8 * 1e6:,.0f} us ({plain / fp8:.2f}x) -> {'FP8' if self.applies(g.m, g.n, g.k) else self.plain}"
                for g, plain, fp8 in self.timings]
        return [head, *rows]


def rule_from_timings(timings: list[tuple[GemmSize, float, float]]) -> float:
    """The smallest size in multiply-adds at or above which FP8 was faster at every measured GEMM: one
    above the largest GEMM where it was not (0 when it always won, math.inf when it lost at the largest)."""
    lost = [g.macs for g, plain, fp8 in timings if fp8 >= plain]
    if not lost:
        return 0
    if max(lost) >= max(g.macs for g, _, _ in timings):
        return math.inf
    return max(lost) + 1


def time_gemm(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` over `reps` calls after `warmup` untimed ones, each call timed on its own:
    CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def time_fp8_gemms(gemms: list[GemmSize], recipe: Recipe, device: torch.device, dtype: torch.dtype,
                   real: bool) -> list[tuple[GemmSize, float, float]]:
    """Each GEMM timed on random operands in `dtype`, laid out as model/linear.py passes them: the plain
    product, and the recipe's FP8 product with its amax reductions and casts (`real`: `torch._scaled_mm`;
    else the emulation)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        if transposed:  # laid out as the linear hands it over: a transposed view of a (cols, rows) tensor
            return torch.randn(cols, rows, device=device, dtype=dtype, generator=generator).t()
        return torch.randn(rows, cols, device=device, dtype=dtype, generator=generator)

    timings = []
    for g in dict.fromkeys(gemms):  # distinct, in order
        gemm = {"forward": recipe.forward, "input grad": recipe.input_grad, "weight grad": recipe.weight_grad}[g.role]
        # forward X (rows, in) and W (out, in); input grad dY (rows, out) and W^T; weight grad dY^T and X^T
        a = operand(g.m, g.k, transposed=g.role == "weight grad")
        b = operand(g.n, g.k, transposed=g.role != "forward")
        plain = time_gemm(lambda: a @ b.t(), device)
        low = time_gemm(lambda: fp8_gemm(a, b, gemm, dtype, real), device)
        timings.append((g, plain, low))
    return timings


def agree_across_ranks(min_macs: float, device: torch.device) -> float:
    """Rank 0's size, so that every rank of a distributed run multiplies the same GEMMs in FP8."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return min_macs
    value = torch.tensor([min_macs], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


class Quantizer:
    """Runs one recipe's GEMMs. Stochastic rounding and redrawn Hadamard signs draw from torch's global
    generator, which the trainer seeds and checkpoints, so a resumed run draws what the uninterrupted one
    would; a fixed sign vector comes from `seed`. An FP8 recipe's GEMMs below its size rule run in the
    compute dtype."""

    def __init__(self, recipe: Recipe, seed: int, fp8_min_macs: int = -1):
        self.recipe = recipe
        self.seed = seed
        self._fixed_signs: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.fp8_min_macs = fp8_min_macs  # -1: measured by `fit` on FP8 tensor cores
        self.rule = SizeRule() if fp8_min_macs < 0 else SizeRule(fp8_min_macs, "set by fp4.fp8_min_macs")

    def fit(self, gemms: list[GemmSize], device: torch.device, dtype: torch.dtype) -> list[str]:
        """Fits the recipe to a run on `device` whose GEMMs under it are `gemms`, in `dtype`: FP8's size rule,
        measured where it is FP8's to measure (module docstring). Returns what to print at start."""
        if self.recipe.name != "fp8":
            return []
        if self.fp8_min_macs < 0 and not has_fp8_tensor_cores(device):
            self.rule = SizeRule(0, "FP8 emulated here, so every GEMM")
        elif self.fp8_min_macs < 0:
            timings = time_fp8_gemms(gemms, self.recipe, device, dtype, real=True)
            self.rule = SizeRule(agree_across_ranks(rule_from_timings(timings), device),
                                 f"measured at start on {torch.cuda.get_device_name(device)}, casts included", timings,
                                 str(dtype).removeprefix("torch."), collections.Counter(gemms))
        return self.rule.lines()

    def signs(self, n: int, device: torch.device) -> torch.Tensor:
        if self.recipe.fresh_signs:
            return torch.randint(0, 2, (n,), device=device).float() * 2 - 1
        if (n, device) not in self._fixed_signs:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._fixed_signs[n, device] = torch.randint(0, 2, (n,), device=device, generator=g).float() * 2 - 1
        return self._fixed_signs[n, device]

    def takes(self, g: GemmRecipe, m: int, n: int, k: int) -> bool:
        """Whether GEMM recipe `g` changes an (m, k) @ (n, k)^T product: it quantizes or rotates, and an FP8
        GEMM is as large as the size rule asks. The linear multiplies the others as F.linear would."""
        if not g.quantized and not g.hadamard:
            return False
        return g.a.format not in ("e4m3", "e5m2") or self.rule.applies(m, n, k)

    def gemm(self, a: torch.Tensor, b: torch.Tensor, g: GemmRecipe) -> torch.Tensor:
        """A (M, K) @ B (N, K)^T under GEMM recipe `g`, returned in A's dtype."""
        dtype = a.dtype
        if not g.quantized and not g.hadamard:
            return a @ b.t()
        if g.a.format in ("e4m3", "e5m2"):
            return fp8_gemm(a, b, g, dtype, real=has_fp8_tensor_cores(a.device))
        if g.hadamard:
            signs = self.signs(g.hadamard, a.device)
            a, b = random_hadamard(a.float(), signs), random_hadamard(b.float(), signs)
        qa = quantize(a, g.a) if g.a.format else a.float()
        qb = quantize(b, g.b) if g.b.format else b.float()
        return qa.to(dtype) @ qb.to(dtype).t()


def execution_path(recipe: str, device: torch.device) -> str:
    """Which path runs `recipe` on `device`, in words, printed at start."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(device) if cuda else None
    if recipe == "fp8":
        if capability is not None and capability >= (8, 9):
            return f"fp8: real FP8 GEMMs (torch._scaled_mm on sm_{capability[0]}{capability[1]})"
        where = f"sm_{capability[0]}{capability[1]}" if capability else device.type.upper()
        return f"fp8: emulated on {where} (no FP8 tensor cores): FP8 values, GEMMs in higher precision"
    where = f"sm_{capability[0]}{capability[1]}" if capability else device.type.upper()
    blackwell = capability is not None and capability[0] in (10, 12)
    note = " (this Blackwell GPU could run it natively; the FP4 kernels are not wired in yet)" if blackwell else ""
    return f"{recipe}: FP4 emulated on {where}: values rounded to FP4, GEMMs in higher precision{note}"


@dataclass(frozen=True)
class PrecisionShape:
    """Which GEMMs of a model run under a recipe: all blocks but the first `bf16_first` and last `bf16_last`,
    and the LM head with `head`."""
    recipe: str
    bf16_first: int = 0
    bf16_last: int = 0
    head: bool = False
    hadamard: int = 0  # random Hadamard block; 0 = the recipe's own
    seed: int = 0
    fp8_min_macs: int = -1  # FP8's size rule: -1 measured at start, else GEMMs of at least this many in FP8

    @classmethod
    def from_config(cls, f) -> "PrecisionShape | None":
        """The shape of the config's `[fp4]` section; None when no recipe is chosen."""
        if f.recipe == "none":
            return None
        return cls(f.recipe, f.bf16_first_blocks, f.bf16_last_blocks, f.quantize_head, f.hadamard_block, f.seed,
                   f.fp8_min_macs)

    def quantizer(self) -> Quantizer:
        return Quantizer(make_recipe(self.recipe, self.hadamard), self.seed, self.fp8_min_macs)

    def note(self, depth: int, device: torch.device) -> str:
        kept = depth - self.bf16_first - self.bf16_last
        return (f"GEMMs: {execution_path(self.recipe, device)}; {kept} of {depth} blocks"
                f"{' and the head' if self.head else ''} under the recipe")
