"""`ternchat plan`: how many bytes a training run needs per device, and whether it fits.

Components, per device (data parallel replicates all but activations' batch share):
- latent weights, fp32: 4 bytes per parameter;
- gradients, fp32: 4 bytes per parameter;
- optimizer state, by method: Muon 4 B per matrix value (8-bit: 1 + 4/block), GUM the expected
  (1-q) r max(m,n) + q m n momentum values plus the fp32 projector, GaLore-AdamW two moments of
  r max(m,n) plus projector, AdamW 8 B (8-bit AdamW 2 B), FOAM 8 / 2^l B;
- activations saved for backward under bf16 autocast: per token and block 54 d + 12 d_ff +
  16 heads bytes, per token 10 d + 4 V for embedding, final norm and logits, and a bf16 copy of
  every matrix (2 B per value). These coefficients were counted with autograd's saved-tensor hooks
  on this model (`tests/test_plan.py` re-counts them); with activation checkpointing only each
  block's fp32 input (4 d per token) is kept, plus one block being recomputed;
- workspace: the logits' gradient (8 V bytes per token), Newton–Schulz temporaries, and on a GPU
  the CUDA context and allocator slack (1 GiB + 5%).
The sum is an upper bound: gradients fill in while activations are freed, so they never all
coexist; measured tensor peaks on CPU came out 0–16% below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ternchat.config import Config, OptimConfig
from ternchat.model.gpt import GPTShape

CUDA_CONTEXT = 1 << 30


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*(b|kib|mib|gib|tib|kb|mb|gb|tb)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GiB or 96GB")
    units = {None: 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


def block_matrices(s: GPTShape) -> list[tuple[int, int]]:
    """(rows, cols) of every block matrix, as nn.Linear stores them (out, in)."""
    per_block = [(3 * s.d_model, s.d_model), (s.d_model, s.d_model), (s.d_ff, s.d_model), (s.d_model, s.d_ff)]
    return per_block * s.depth


def matrix_state_bytes(rows: int, cols: int, o: OptimConfig) -> float:
    values = rows * cols
    state_bytes = (1 + 4 / o.block_size_8bit) if o.use_8bit_optim else 4.0
    projected = o.use_galore and min(rows, cols) >= o.galore_min_dim and o.galore_rank <= min(rows, cols)
    if o.matrix_optimizer == "muon":
        if not projected:
            return values * state_bytes
        q = o.gum_full_rank_prob if o.galore_rank < min(rows, cols) else 0.0
        momentum = (1 - q) * o.galore_rank * max(rows, cols) + q * values
        return momentum * state_bytes + 4 * o.galore_rank * min(rows, cols)
    if o.matrix_optimizer == "foam":
        return 8 * values / 2 ** o.foam_level
    if projected:  # GaLore with AdamW
        return 8 * o.galore_rank * max(rows, cols) + 4 * o.galore_rank * min(rows, cols)
    return 8 * values


@dataclass
class Plan:
    components: dict[str, float]
    budget: int | None
    micro_batch: int
    largest_micro_batch: int | None
    smallest_total: float  # micro-batch 1

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget


def plan_memory(cfg: Config, vocab_size: int, micro_batch: int | None = None, gpu_mem: int | None = None,
                gpus: int = 1, checkpointing: bool = False, device: str = "cuda") -> Plan:
    s = GPTShape.from_config(cfg.model, vocab_size)
    o = cfg.optim
    matrices = block_matrices(s)
    matrix_params = sum(r * c for r, c in matrices)
    embed_head = 2 * s.vocab_size * s.d_model
    gains = s.depth * (2 * s.d_model + 2 * s.head_dim + s.d_model + s.d_ff) + s.d_model
    params = matrix_params + embed_head + gains
    if o.foam_embed_head:
        other_state = 8 * embed_head / 2 ** o.foam_level
    else:
        other_state = (2 if o.adamw_8bit else 8) * embed_head
    optimizer = sum(matrix_state_bytes(r, c, o) for r, c in matrices) + other_state + 8 * gains
    largest = max(r * c for r, c in matrices)

    def components(batch: int) -> dict[str, float]:
        tokens = batch * s.seq_len
        per_block = 54 * s.d_model + 12 * s.d_ff + 16 * s.n_heads
        if checkpointing:
            saved = tokens * (s.depth * 4 * s.d_model + per_block)
        else:
            saved = tokens * s.depth * per_block
        activations = saved + tokens * (10 * s.d_model + 4 * s.vocab_size) + 2 * (matrix_params + embed_head / 2)
        workspace = 8 * s.vocab_size * tokens + 3 * 2 * largest
        if device == "cuda":
            workspace += CUDA_CONTEXT
        parts = {"weights (fp32 latent)": 4.0 * params, "gradients (fp32)": 4.0 * params,
                 "optimizer state": float(optimizer), "activations": float(activations), "workspace": float(workspace)}
        if device == "cuda":
            parts["allocator slack (5%)"] = 0.05 * sum(parts.values())
        return parts

    batch = micro_batch or cfg.train.batch_size
    best = None
    if gpu_mem is not None:
        for b in range(1, 4097):
            if sum(components(b).values()) > gpu_mem:
                break
            best = b
    return Plan(components(batch), gpu_mem, batch, best, sum(components(1).values()))


def format_plan(plan: Plan, title: str, gpus: int) -> str:
    gib = 2 ** 30
    lines = [f"{title}: per device ({gpus} device(s), data parallel: every device holds all of it)",
             "| component | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / gib:,.2f} |" for name, value in plan.components.items()]
    lines.append(f"| **total** (micro-batch {plan.micro_batch}) | **{plan.total / gib:,.2f}** |")
    if plan.budget is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        fixed = sum(plan.components[k] for k in ("weights (fp32 latent)", "gradients (fp32)", "optimizer state"))
        if plan.largest_micro_batch:
            largest = f"largest micro-batch that fits: {plan.largest_micro_batch}"
        elif fixed > plan.budget:
            largest = (f"no micro-batch fits: weights, gradients and optimizer state alone take {fixed / gib:,.1f} "
                       "GiB")
        else:
            largest = f"no micro-batch fits: micro-batch 1 needs {plan.smallest_total / gib:,.1f} GiB"
        lines.append(f"\nverdict: {verdict} in {plan.budget / gib:,.1f} GiB; {largest}")
    return "\n".join(lines)


def measure_cpu(cfg: Config, vocab_size: int, micro_batch: int) -> dict[str, int]:
    """Measure a real training step of the config's model on this CPU.

    `tensor_peak`: the most tensor bytes alive at once during a step (weights, optimizer state and
    what was live when it started, plus the peak of the profiler's allocation record during it),
    what the plan estimates and what a CUDA allocator's peak would show. `rss_added`: the growth of
    the process's peak resident set, which also counts the C allocator's cached and fragmented
    memory.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ternchat.model.gpt import GPT
    from ternchat.optim.factory import build_optimizer
    from ternchat.train.trainer import autocast_for, proc_status_bytes

    before = proc_status_bytes("VmRSS") or 0
    torch.manual_seed(0)
    model = GPT(GPTShape.from_config(cfg.model, vocab_size))
    optimizer = build_optimizer(model, cfg.optim)
    autocast = autocast_for(cfg.train.dtype, torch.device("cpu"))
    batch = torch.randint(0, vocab_size, (micro_batch, cfg.model.seq_len + 1))

    def step() -> None:
        with autocast:
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first step creates the optimizer state
    live = sum(p.numel() * p.element_size() for p in model.parameters()) + optimizer.state_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return {"tensor_peak": live + peak, "rss_added": (proc_status_bytes("VmHWM") or 0) - before}
