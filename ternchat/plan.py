"""`ternchat plan`: how many bytes a training run needs per device, and whether it fits.

Components, per device. With N devices, FSDP2 (`dist.strategy = "fsdp2"`) divides weights,
gradients and the AdamW state by N and adds its working set (two blocks' gathered weights, the
root's embedding and head, one block's fp32 gradient); DDP replicates them. Either way each block
matrix's optimizer state lives on its one owner rank (1/N each), and the step gathers a block's
matrices whole to their owners (value and gradient, fp32).
- latent weights, fp32: 4 bytes per parameter;
- gradients, fp32: 4 bytes per parameter;
- optimizer state, by method: Muon 4 B per matrix value (8-bit: 1 + 4/block), GUM the momentum
  of the gamma blocks drawn for a full-rank step (m n values per matrix) and of the others
  (r max(m,n)) plus the fp32 projector, exact since exactly gamma blocks are drawn each period;
  GaLore-AdamW two moments of r max(m,n) plus projector, AdamW 8 B (8-bit AdamW 2 B, only where
  bitsandbytes is installed: without it the trainer runs fp32 AdamW and the plan counts that),
  FOAM 8 / 2^l B;
- activations saved for backward under bf16 autocast: per token and block 58 d + 12 d_ff +
  16 heads bytes (the quantized input is saved once for each of q, k and v), per token 10 d + 4 V
  for embedding, final norm and logits, and a bf16 copy of every matrix (2 B per value). These
  coefficients were counted with autograd's saved-tensor hooks on this model (`tests/test_plan.py`
  re-counts them). With `train.activation_checkpointing = "full"` each block keeps only its fp32
  input (4 d per token); "selective" keeps also the matmul and attention outputs and the
  per-token scales (`selective_bytes_per_token`); both add one block being recomputed and keep
  the bf16 matrix copies of that block only;
- the logits' gradient during backward (8 V bytes per token);
- the optimizer step's temporaries: for Muon the Newton-Schulz iteration over a stack of
  same-shape matrices (up to `muon.NS_CHUNK_VALUES` values at once) and the fp32 copies of 8-bit
  momentum, with coefficients measured on this code (`tests/test_plan.py` re-measures them);
- on a GPU the CUDA context and allocator slack (1 GiB + 5%).
With `dist.offload` the fp32 weights, gradients and optimizer state move to the host's column
(for the whole machine, plus a whole fp32 copy of the model that end-of-run samples and evals
build there), and the GPU keeps what streams through it: two blocks' gathered weights and the
fp32 copy of one arriving from the host, one block's gradient in the compute dtype with its fp32
reduction and result waiting for the copy back, the root's embedding and head and their
gradients, and for the step one block's matrices, gradients and optimizer state (the largest
block's: a GUM full-rank one) besides the Newton-Schulz workspace. The plan also counts the bytes
that cross the host link per optimizer step, the lower bound on a step's time that offload adds
where compute cannot hide it.
The step's temporaries come after backward has freed the activations, so the peak counts the
larger of the two phases. It is still an upper bound: gradients fill in while activations are
freed, so they never all coexist; measured tensor peaks on CPU come out below it (docs/memory.md).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field

from ternchat.config import Config, ConfigError, OptimConfig, parse_bytes
from ternchat.model.gpt import GPTShape
from ternchat.optim.muon import stack_size

CUDA_CONTEXT = 1 << 30
# Peak temporaries of one Newton-Schulz step over a stack of k matrices of m x n (m' = min(m, n)),
# measured with the profiler on this code's Muon (tests/test_plan.py): bytes per value and per
# entry of the m' x m' Gram matrices, for the iterations in bf16 (a device that multiplies bf16 natively).
NS_BYTES_PER_VALUE = 16.0
NS_BYTES_PER_GRAM = 6.0


def one_block_matrices(s: GPTShape) -> list[tuple[int, int]]:
    """(rows, cols) of one block's matrices, as nn.Linear stores them (out, in): q, k, v, o, [gate,] up, down."""
    mlp_in = [(s.d_ff, s.d_model)] * (1 if s.mlp == "relu2" else 2)
    return [(s.d_model, s.d_model)] * 4 + mlp_in + [(s.d_model, s.d_ff)]


def one_block_gains(s: GPTShape) -> int:
    """One block's norm gains: the two pre-norms, [q and k norms,] and the SubLNs before o_proj and down."""
    return 2 * s.d_model + (2 * s.head_dim if s.qk_norm else 0) + s.d_model + s.d_ff


def block_matrices(s: GPTShape) -> list[tuple[int, int]]:
    """(rows, cols) of every block matrix of the trunk."""
    return one_block_matrices(s) * s.depth


def hyper_connection_matrices(s: GPTShape) -> list[tuple[int, int]]:
    """mHC's coefficient maps phi (n^2 + 2n, n d), one per sublayer (Muon steps them with the block's matrices)."""
    n = s.mhc_streams
    return [] if n == 1 else [(n * n + 2 * n, n * s.d_model)] * (2 * s.depth)


def hyper_connection_activation_bytes(s: GPTShape) -> float:
    """What mHC's wiring adds to a block's saved activations per token: the n-stream state each sublayer's
    mixing keeps, the fp32 copy of the sublayer output, the aggregated input and the small coefficient
    tensors; fitted to autograd's saved tensors (storage bytes) in tests/test_plan.py."""
    n = s.mhc_streams
    return 0.0 if n == 1 else 8.625 * n * s.d_model + 7 * s.d_model + 31 * n * n + 62 * n


def mtp_matrices(s: GPTShape) -> list[tuple[int, int]]:
    """The matrices of multi-token prediction: a block per extra head, or per module plus its 2d -> d projection."""
    if s.mtp is None:
        return []
    projection = [(s.d_model, 2 * s.d_model)] if s.mtp.kind == "modules" else []
    return (one_block_matrices(s) + projection) * s.mtp.n_future


def mtp_gains(s: GPTShape) -> int:
    """Norm gains of multi-token prediction: each block's, and each head's or module's own norms."""
    if s.mtp is None:
        return 0
    return s.mtp.n_future * (one_block_gains(s) + (3 if s.mtp.kind == "modules" else 1) * s.d_model)


def adamw_8bit_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def gum_full_rank_share(rows: int, cols: int, o: OptimConfig, depth: int) -> float:
    """Share of the blocks whose copy of this matrix takes GUM's full-rank step in a period: exactly
    gamma / depth, since exactly gamma blocks are drawn (0 where GUM does not project it below full rank)."""
    projected = o.use_galore and min(rows, cols) >= o.galore_min_dim and o.galore_rank < min(rows, cols)
    return o.gum_full_rank_layers / depth if projected and o.matrix_optimizer == "muon" else 0.0


def matrix_state_bytes(rows: int, cols: int, o: OptimConfig, full_rank_share: float = 0.0) -> float:
    """Optimizer state of one matrix, averaged over the blocks (GUM: `full_rank_share` of them full rank)."""
    values = rows * cols
    state_bytes = (1 + 4 / o.block_size_8bit) if o.use_8bit_optim else 4.0
    projected = o.use_galore and min(rows, cols) >= o.galore_min_dim and o.galore_rank <= min(rows, cols)
    if o.matrix_optimizer == "muon":
        if not projected:
            return values * state_bytes
        momentum = (1 - full_rank_share) * o.galore_rank * max(rows, cols) + full_rank_share * values
        return momentum * state_bytes + 4 * o.galore_rank * min(rows, cols)
    if o.matrix_optimizer == "foam":
        return 8 * values / 2 ** o.foam_level
    if projected:  # GaLore with AdamW
        return 8 * o.galore_rank * max(rows, cols) + 4 * o.galore_rank * min(rows, cols)
    return 8 * values


def newton_schulz_workspace_of(count: int, rows: int, cols: int, o: OptimConfig) -> float:
    """Peak temporary bytes of Muon's step over one stack of `count` rows x cols matrices."""
    per_matrix = NS_BYTES_PER_VALUE * rows * cols + NS_BYTES_PER_GRAM * min(rows, cols) ** 2
    if o.use_8bit_optim:
        per_matrix += 4 * rows * cols  # the fp32 copy of the int8 momentum
    return count * per_matrix


def newton_schulz_workspace(s: GPTShape, o: OptimConfig) -> float:
    """Peak bytes of the optimizer step's temporaries for the block matrices."""
    shapes = Counter(block_matrices(s) + mtp_matrices(s))
    if o.matrix_optimizer != "muon":  # element-wise updates: a few fp32 temporaries of one matrix
        return 3 * 4.0 * max(r * c for r, c in shapes)
    if o.use_galore:  # GUM orthogonalizes one matrix at a time; the full-rank branch is the largest
        return max(newton_schulz_workspace_of(1, r, c, o) for r, c in shapes)
    return max(newton_schulz_workspace_of(min(k, stack_size(r, c)), r, c, o) for (r, c), k in shapes.items())


def activation_bytes_per_token(s: GPTShape) -> float:
    """What one block saves for backward per token under bf16 autocast, fitted to autograd's saved tensors
    (tests/test_plan.py): 58 d + 12 d_ff + 16 heads for the default block; QK-norm's share is 16 d + 8
    heads; a gated MLP's gate adds 4.5 d_ff."""
    qk = 16 * s.d_model + 8 * s.n_heads if s.qk_norm else 0
    gate = 4.5 * s.d_ff if s.mlp != "relu2" else 0
    return 42 * s.d_model + 12 * s.d_ff + 8 * s.n_heads + qk + gate


def selective_bytes_per_token(s: GPTShape) -> float:
    """What selective checkpointing keeps per token and block under bf16 autocast: the fp32 block input,
    the bf16 outputs of the matmuls (q, k, v, o: 4 d; up: d_ff; down: d) and of attention (d, plus its
    fp32 log-sum-exp per head), and the fp32 per-token reductions of the norms and of BitLinear's scales."""
    gate = 2 * s.d_ff if s.mlp != "relu2" else 0  # the gate's matmul output
    qk = 8 * s.n_heads if s.qk_norm else 0  # the q and k norms' reductions
    return 4 * s.d_model + 2 * (6 * s.d_model + s.d_ff) + gate + 4 * s.n_heads + 4 * (6 + 4) + qk


BACKWARD_PHASE = ("activations", "logits gradient")
STEP_PHASE = "optimizer step temporaries"


def peak_bytes(parts: dict[str, float]) -> float:
    """Everything that lives through the step, plus the larger of its two phases: forward/backward
    (activations and the logits' gradient) or the optimizer step's temporaries, which start after
    backward has freed the activations."""
    phases = (*BACKWARD_PHASE, STEP_PHASE)
    return (sum(v for k, v in parts.items() if k not in phases)
            + max(sum(parts.get(k, 0.0) for k in BACKWARD_PHASE), parts.get(STEP_PHASE, 0.0)))


@dataclass
class Plan:
    components: dict[str, float]
    budget: int | None
    micro_batch: int
    largest_micro_batch: int | None
    smallest_total: float  # micro-batch 1
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # with offload: host memory of the whole machine
    host_budget: int | None = None
    link_bytes_per_step: dict[str, float] = field(default_factory=dict)  # with offload: to and from the GPUs

    @property
    def total(self) -> float:
        return peak_bytes(self.components)

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def fits(self) -> bool | None:
        if self.budget is None:
            return None
        return self.total <= self.budget and (self.host_budget is None or self.host_total <= self.host_budget)


def plan_memory(cfg: Config, vocab_size: int, micro_batch: int | None = None, gpu_mem: int | None = None,
                gpus: int = 1, device: str = "cuda", host_mem: int | None = None) -> Plan:
    s = GPTShape.from_config(cfg, vocab_size)
    o = cfg.optim
    trunk = block_matrices(s) + hyper_connection_matrices(s)
    matrices = trunk + mtp_matrices(s)
    matrix_params = sum(r * c for r, c in matrices)
    embed_head = (1 if s.tie_embeddings else 2) * s.vocab_size * s.d_model
    n = s.mhc_streams
    hc_scalars = 0 if n == 1 else 2 * s.depth * (3 + n * n + 2 * n)  # gating factors and static biases
    exit_gate = s.d_model + 1 if s.loop_steps > 1 else 0
    gains = s.depth * one_block_gains(s) + s.d_model + mtp_gains(s) + hc_scalars + exit_gate
    params = matrix_params + embed_head + gains
    notes = []
    eight_bit_adamw = o.adamw_8bit and not o.foam_embed_head
    if eight_bit_adamw and not adamw_8bit_available():
        eight_bit_adamw = False
        notes.append("optim.adamw_8bit is set but bitsandbytes is not installed: the trainer falls back to fp32 "
                     "AdamW for embedding and head, and this plan counts that (pip install 'ternchat[bnb]')")
    if o.foam_embed_head:
        other_state = 8 * embed_head / 2 ** o.foam_level
    else:
        other_state = (2 if eight_bit_adamw else 8) * embed_head
    offload = cfg.dist.offload
    strategy = cfg.dist.strategy if gpus > 1 or offload else "none"
    if gpus > 1 and strategy == "none":
        notes.append(f"{gpus} devices but dist.strategy = 'none': planned as one process per device, unsharded")
    shards = gpus if strategy == "fsdp2" else 1  # FSDP2 cuts weights, gradients and AdamW state N ways
    owners = gpus if strategy != "none" else 1  # each block matrix's optimizer state lives on one rank
    matrix_state = sum(matrix_state_bytes(r, c, o, gum_full_rank_share(r, c, o, s.depth)) for r, c in matrices)
    optimizer = matrix_state / owners + (other_state + 8 * gains) / shards
    optimizer_workspace = newton_schulz_workspace(s, o)
    block_values = sum(r * c for r, c in trunk) // s.depth
    gather = 2 if cfg.dist.fsdp_param_dtype == "bf16" else 4
    if offload:  # the step streams one block's matrices, gradients and state (a full-rank GUM block's) through
        block_state = sum(matrix_state_bytes(r, c, o, 1.0) for r, c in trunk[:len(trunk) // s.depth])
        optimizer_workspace += 8.0 * block_values + block_state
    recompute = cfg.train.activation_checkpointing
    # The bf16 copy of each matrix that the forward saves for backward (autocast's cast, or the gathered
    # copy under FSDP2): every block's, or with recompute only the block being recomputed.
    # A looped model's ternary weights are quantized again in each pass, so each pass saves its own copy.
    looped_copies = (s.loop_steps - 1) * sum(r * c for r, c in block_matrices(s))
    head_values = s.vocab_size * s.d_model  # the head's bf16 copy (tied or not)
    weight_copies = 2 * ((block_values if recompute != "none" else matrix_params + looped_copies) + head_values)

    def components(batch: int) -> dict[str, float]:
        tokens = batch * s.seq_len
        per_block = activation_bytes_per_token(s)
        trunk_block = per_block + hyper_connection_activation_bytes(s)
        # a looped model keeps every pass's activations and every pass's logits (its exit objective)
        passes = s.loop_steps
        if recompute == "full":  # each block's n-stream input, and one block's activations during its recompute
            saved = tokens * (passes * s.depth * 4 * n * s.d_model + trunk_block)
        elif recompute == "selective":
            saved = tokens * (passes * s.depth * (selective_bytes_per_token(s) + hyper_connection_activation_bytes(s))
                              + trunk_block)
        else:
            saved = tokens * passes * s.depth * trunk_block
        # MTP: each extra block keeps its activations (no recompute); heads free their logits one at a
        # time (their sequential backward), modules keep theirs until the backward
        mtp_depths, mtp_kind = (s.mtp.n_future, s.mtp.kind) if s.mtp is not None else (0, "none")
        saved += tokens * mtp_depths * per_block
        kept_logits = passes + (mtp_depths if mtp_kind == "modules" else 0)
        activations = saved + tokens * (10 * s.d_model * passes + 4 * s.vocab_size * kept_logits) + weight_copies
        if mtp_kind == "heads":  # the gradients the heads' sequential backward holds until the trunk's
            activations += 4.0 * (sum(r * c for r, c in mtp_matrices(s)) + mtp_gains(s) + head_values + s.d_model)
        parts = {"weights (fp32 latent)": 4.0 * params / shards, "gradients (fp32)": 4.0 * params / shards,
                 "optimizer state": float(optimizer), "activations": float(activations),
                 "logits gradient": 8.0 * s.vocab_size * tokens, STEP_PHASE: float(optimizer_workspace)}
        # Gathered weights: two blocks' (one computing, one prefetched), or every block's where they stay
        # gathered from forward to backward; the root's embedding and head.
        gathered = gather * ((2 * block_values if cfg.dist.reshard_after_forward else matrix_params) + embed_head)
        if offload:
            for resident in ("weights (fp32 latent)", "gradients (fp32)", "optimizer state"):
                del parts[resident]
            # plus the fp32 copy of the block arriving from the host
            parts["FSDP2 streamed weights"] = float(gathered + 4 * block_values)
            parts["gradients in flight"] = float((gather + 8) * block_values + gather * embed_head)
        elif shards > 1:  # plus one block's fp32 gradient before its reduce-scatter
            parts["FSDP2 gathered weights"] = float(gathered + 4 * block_values)
        if owners > 1 and not offload:  # a block's matrices and gradients gathered whole to their owners
            parts[STEP_PHASE] += 8.0 * block_values
        if device == "cuda":
            parts["CUDA context"] = float(CUDA_CONTEXT)
            parts["allocator slack (5%)"] = 0.05 * peak_bytes(parts)
        return parts

    batch = micro_batch or cfg.train.batch_size
    best = None
    if gpu_mem is not None:
        for b in range(1, 4097):
            if peak_bytes(components(b)) > gpu_mem:
                break
            best = b
    plan = Plan(components(batch), gpu_mem, batch, best, peak_bytes(components(1)), notes, host_budget=host_mem)
    if offload:
        plan.host = {"weights (fp32 latent)": 4.0 * params, "gradients (fp32)": 4.0 * params,
                     "optimizer state": float(matrix_state + other_state + 8 * gains),
                     "whole-model copy for samples and evals": 8.0 * params}
        if cfg.train.grad_accum > 1:  # HostGradientSum: a micro-batch's pinned gradients before they are added
            plan.host["next micro-batch's gradients (fp32, pinned)"] = 4.0 * params
        passes = 2 if cfg.dist.reshard_after_forward else 1  # forward, and again for backward
        accum = cfg.train.grad_accum
        plan.link_bytes_per_step = {  # per GPU: its shards' weights every pass, its gradients, its owned matrices
            "to the GPU": (accum * passes * 4 * params + 8 * matrix_params + matrix_state) / shards,
            "to the host": (accum * 4 * params + 4 * matrix_params + matrix_state) / shards}
    return plan


PCIE4_X16_BYTES_PER_S = 25e9  # what pinned copies reach on a PCIe 4.0 x16 link, each direction


def format_plan(plan: Plan, title: str, gpus: int, strategy: str = "none") -> str:
    gib = 2 ** 30
    how = {"fsdp2": "FSDP2: weights, gradients and AdamW state sharded, block matrices' state on one owner each",
           "ddp": "DDP: every device holds the model, block matrices' state on one owner each"}
    layout = how.get(strategy, "one process") if gpus > 1 else "one process"
    if plan.host:
        layout += "; offload: weights, gradients and optimizer state in host memory"
    lines = [f"{title}: per device ({gpus} device(s), {layout})",
             "| component | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / gib:,.2f} |" for name, value in plan.components.items()]
    lines.append(f"| **peak** (micro-batch {plan.micro_batch}) | **{plan.total / gib:,.2f}** |")
    lines.append(f"\nThe peak counts the larger of the backward phase ({' + '.join(BACKWARD_PHASE)}) and the "
                 f"{STEP_PHASE}, which come after backward has freed the activations.")
    if plan.host:
        lines += ["\nHost memory (the whole machine):", "| component | GiB |", "|---|---|"]
        lines += [f"| {name} | {value / gib:,.2f} |" for name, value in plan.host.items()]
        lines.append(f"| **total** | **{plan.host_total / gib:,.2f}** |")
        up, down = plan.link_bytes_per_step["to the GPU"], plan.link_bytes_per_step["to the host"]
        lines.append(f"\nHost link per optimizer step and GPU: {up / 1e9:,.0f} GB to the GPU, {down / 1e9:,.0f} GB "
                     f"back; at {PCIE4_X16_BYTES_PER_S / 1e9:.0f} GB/s each way (PCIe 4.0 x16) at least "
                     f"{max(up, down) / PCIE4_X16_BYTES_PER_S:,.1f} s per step go to copies, hidden only where "
                     "compute takes longer (fewer, larger micro-batches cross the link fewer times)")
    if plan.budget is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        fixed = sum(plan.components.get(k, 0.0) for k in ("weights (fp32 latent)", "gradients (fp32)",
                                                           "optimizer state"))
        if plan.largest_micro_batch:
            largest = f"largest micro-batch that fits: {plan.largest_micro_batch}"
        elif fixed > plan.budget:
            largest = (f"no micro-batch fits: weights, gradients and optimizer state alone take {fixed / gib:,.1f} "
                       "GiB")
        else:
            largest = f"no micro-batch fits: micro-batch 1 needs {plan.smallest_total / gib:,.1f} GiB"
        lines.append(f"\nverdict: {verdict} in {plan.budget / gib:,.1f} GiB; {largest}")
        if plan.host_budget is not None:
            room = "fits in" if plan.host_total <= plan.host_budget else "does NOT fit in"
            lines.append(f"host memory: {plan.host_total / gib:,.1f} GiB {room} {plan.host_budget / gib:,.1f} GiB")
    lines += [f"note: {note}" for note in plan.notes]
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
    from ternchat.train.activation_checkpointing import apply_activation_checkpointing
    from ternchat.train.step import autocast_for
    from ternchat.train.trainer import proc_status_bytes

    before = proc_status_bytes("VmRSS") or 0
    torch.manual_seed(0)
    model = GPT(GPTShape.from_config(cfg, vocab_size))
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
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


def plan_report(cfg: Config, config_name: str | None, gpus: int | None = None, gpu_mem: str | None = None,
                micro_batch: int | None = None, measure: bool = False) -> str:
    """`ternchat plan`: the plan's table for the config's hardware (or the given devices), and with
    `measure` a real step on this CPU against it."""
    vocab, hw = cfg.tokenizer.vocab_size, cfg.hardware
    gpus = gpus or hw.gpus
    memory = gpu_mem or hw.gpu_memory
    try:
        budget = parse_bytes(memory) if memory else None
    except ValueError as e:
        raise ConfigError(f"--gpu-mem: {e}") from None
    host = parse_bytes(hw.host_memory) if hw.host_memory and not gpu_mem else None
    plan = plan_memory(cfg, vocab, micro_batch, budget, gpus, "cpu" if measure else "cuda", host)
    recompute = cfg.train.activation_checkpointing
    title = (f"{config_name or 'tiny_cpu (built-in)'}" + (f" on {hw.name}" if hw.name and not gpu_mem else "")
             + (f", activation checkpointing {recompute}" if recompute != "none" else ""))
    report = format_plan(plan, title, gpus, cfg.dist.strategy)
    if measure:
        measured = measure_cpu(cfg, vocab, plan.micro_batch)
        peak, rss = measured["tensor_peak"], measured["rss_added"]
        report += (f"\n\nmeasured on this CPU: peak tensor bytes {peak / 2**30:,.3f} GiB (planned "
                   f"{plan.total / 2**30:,.3f}, {100 * (plan.total - peak) / peak:+.1f}%); peak RSS added "
                   f"{rss / 2**30:,.3f} GiB (planned {100 * (plan.total - rss) / rss:+.1f}%: RSS also holds the C "
                   "allocator's cache)")
    return report
