"""The GPT: a decoder-only transformer whose block linears are ternary BitLinear layers.

Read top to bottom: token embedding (full precision, untied from the head unless `tie_embeddings`) ->
`depth` pre-norm blocks -> final RMSNorm -> LM head (full precision). A block is
    x = x + o_proj(SubLN(attention(RMSNorm(x))))      attention: q/k/v projections, QK-norm, RoPE, causal SDPA
    x = x + down(SubLN(relu(up(RMSNorm(x)))^2))       ReLU^2 MLP
with SubLN the extra RMSNorm before the output projections of BitNet b1.58 2B4T. As there, q, k
and v are three BitLinear layers, each with its own absmean scale (a fused QKV matrix would share
one scale, and Muon would orthogonalize the three as one matrix). There are no biases. The knobs
`mlp` (relu2, or the gated relu2_glu / swiglu with a third `gate` matrix), `qk_norm` and
`tie_embeddings` give the shapes other engines load natively (docs/use.md). A KV cache serves
incremental decoding; a block can recompute its activations in the backward pass (`Block.recompute`,
set by train/activation_checkpointing.py).

The techniques plug into this model through its hooks, each built by its own module from its shape in
`GPTShape` (None when off, and the model is then exactly the plain GPT):
- which linear: `make_linear` (ternary or dense), whose GEMMs run through model/linear.py's hooks: an
  FP4/FP8 recipe (model/fp4.py) and Collider's row filter (model/collider.py);
- the residual wiring: `make_residual` (plain, or mHC's hyper-connections over `mhc_streams` streams,
  expanded after the embedding and contracted before the final norm; model/mhc.py);
- the depth schedule: `make_loop` (LoopLM's passes over the blocks with an exit gate; the KV cache has a
  slot per pass and layer; model/looped.py);
- the extra heads: `make_mtp` (MTP heads or modules built from the same blocks; model/mtp.py);
- the training loss: `make_objective` (model/objective.py), which `forward(idx, targets)` returns.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ternchat.model.bitlinear import BitLinear, TernaryLinear, make_linear
from ternchat.model.collider import make_collider
from ternchat.model.fp4 import linear_gemms
from ternchat.model.linear import NO_HOOKS, Gemm, Linear, RowFilter
from ternchat.model.looped import make_loop, q_exit_steps
from ternchat.model.mhc import PlainResidual, ResidualStreams, make_residual
from ternchat.model.mtp import make_mtp
from ternchat.model.objective import make_objective
from ternchat.model.shape import GPTShape


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the autocast dtype, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def rms_norm(dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=1e-6)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim; x is (B, T, H, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer, and of every pass of a looped model, for up to `max_len` positions.
    `layer_offset` selects the pass: slot pass * depth + layer."""

    def __init__(self, shape: GPTShape, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        size = (shape.depth * shape.loop_steps, batch, shape.n_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, device=device, dtype=dtype)
        self.v = torch.zeros(size, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.layer_offset = 0
        self.padding: torch.Tensor | None = None  # (batch, max_len) True at left padding: rows of other lengths

    def visible(self, length: int) -> torch.Tensor | None:
        """With left-padded rows: which cached positions each of the next `length` queries attends to,
        (batch, 1, length, pos + length) (causal, no padding; a padding query sees itself, so no row is
        empty); None without padding."""
        if self.padding is None:
            return None
        end = self.pos + length
        keys = torch.arange(end, device=self.padding.device)
        queries = torch.arange(self.pos, end, device=self.padding.device)[:, None]
        allowed = (keys <= queries) & ~self.padding[:, None, :end]
        return (allowed | (keys == queries))[:, None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        slot = self.layer_offset + layer
        self.k[slot, :, :, self.pos:end] = k
        self.v[slot, :, :, self.pos:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]

    def copy_pass(self, source: int, targets: range, depth: int, length: int) -> None:
        """Give the next `length` positions, in the passes `targets` they skipped, pass `source`'s keys and
        values (a token that exited early still has to be attended to by later tokens' deeper passes)."""
        span = slice(self.pos, self.pos + length)
        layers = slice(source * depth, (source + 1) * depth)
        for target in targets:
            self.k[target * depth:(target + 1) * depth, :, :, span] = self.k[layers, :, :, span]
            self.v[target * depth:(target + 1) * depth, :, :, span] = self.v[layers, :, :, span]


class Attention(nn.Module):
    def __init__(self, s: GPTShape, layer: int, gemm: Gemm = NO_HOOKS):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, s.n_heads, s.head_dim
        self.q_proj = make_linear(s.d_model, s.d_model, s.quant, gemm)
        self.k_proj = make_linear(s.d_model, s.d_model, s.quant, gemm)
        self.v_proj = make_linear(s.d_model, s.d_model, s.quant, gemm)
        self.q_norm, self.k_norm = ((rms_norm(s.head_dim), rms_norm(s.head_dim)) if s.qk_norm
                                    else (nn.Identity(), nn.Identity()))
        self.sub_norm = rms_norm(s.d_model)
        self.o_proj = make_linear(s.d_model, s.d_model, s.quant, gemm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        start, visible = 0, None
        if cache is not None:
            start, visible = cache.pos, cache.visible(T)
            k, v = cache.store(self.layer, k, v)
        if visible is not None:  # rows of different lengths, left-padded
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries see the whole cache and the causal part of themselves
            allowed = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(self.sub_norm(y))


class MLP(nn.Module):
    """relu2: down(SubLN(relu(up x)^2)); the gated forms multiply the activation of a gate projection
    with up x: relu(gate x)^2 (relu2_glu, HF BitNet) or silu(gate x) (swiglu, llama.cpp's bitnet)."""

    def __init__(self, s: GPTShape, gemm: Gemm = NO_HOOKS):
        super().__init__()
        self.kind = s.mlp
        self.gate = make_linear(s.d_model, s.d_ff, s.quant, gemm) if s.mlp != "relu2" else None
        self.up = make_linear(s.d_model, s.d_ff, s.quant, gemm)
        self.sub_norm = rms_norm(s.d_ff)
        self.down = make_linear(s.d_ff, s.d_model, s.quant, gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            hidden = F.relu(self.up(x)).square()
        elif self.kind == "swiglu":
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = F.relu(self.gate(x)).square() * self.up(x)
        return self.down(self.sub_norm(hidden))


class Block(nn.Module):
    def __init__(self, s: GPTShape, layer: int, residual: Callable[[], nn.Module] = PlainResidual,
                 gemm: Gemm = NO_HOOKS):
        super().__init__()
        self.attn_norm, self.attn = rms_norm(s.d_model), Attention(s, layer, gemm)
        self.mlp_norm, self.mlp = rms_norm(s.d_model), MLP(s, gemm)
        self.attn_residual, self.mlp_residual = residual(), residual()  # x + F(x), or mHC's wiring
        self.recompute: dict[str, Callable] | None = None  # checkpoint's options, set by train/activation_checkpointing.py

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        if self.recompute is not None and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, None, use_reentrant=False, **self.recompute)
        return self._forward(x, cos, sin, cache)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.attn_residual(x, lambda u: self.attn(self.attn_norm(u), cos, sin, cache))
        return self.mlp_residual(x, lambda u: self.mlp(self.mlp_norm(u)))


def gemm_hooks(shape: GPTShape, rows: RowFilter | None) -> tuple[list[Gemm], Gemm]:
    """Each block's GEMM hooks and the head's: the precision recipe where it applies, and the row filter."""
    p = shape.precision
    quantizer = p.quantizer() if p is not None else None
    quantized = range(p.bf16_first, shape.depth - p.bf16_last) if p is not None else range(0)
    blocks = [Gemm(quantizer if i in quantized else None, rows) for i in range(shape.depth)]
    return blocks, Gemm(quantizer if p is not None and p.head else None, rows)


class GPT(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.streams = ResidualStreams(shape.mhc_streams)
        self.objective = make_objective(shape)  # None: the next token's cross-entropy (model/objective.py)
        self.collider = make_collider(shape.collider)
        block_gemms, head_gemm = gemm_hooks(shape, self.collider.rows if self.collider is not None else None)
        self.blocks = nn.ModuleList(Block(shape, i, lambda: make_residual(shape), block_gemms[i])
                                    for i in range(shape.depth))
        self.final_norm = rms_norm(shape.d_model)
        self.lm_head = Linear(shape.d_model, shape.vocab_size, head_gemm)
        if shape.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = make_mtp(shape, lambda layer: Block(shape, layer), rms_norm)  # plain residual: one block each
        self.loop = make_loop(shape)
        cos, sin = rotary_tables(shape.seq_len, shape.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if self.loop is not None and self.loop.stage == "gate":  # stage II: the LM is frozen, the gate trains
            gate = set(map(id, self.loop.gate.parameters()))
            for p in self.parameters():
                p.requires_grad_(id(p) in gate)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.shape.tie_embeddings:  # one matrix embeds and scores: a linear's scale, not the embedding's 1.0
            nn.init.normal_(self.embed.weight, std=self.shape.d_model ** -0.5)
        else:
            nn.init.normal_(self.embed.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in (m for m in self.modules() if isinstance(m, Block)):  # the trunk's and MTP's
            for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.up, block.mlp.gate):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
            for linear in (block.attn.o_proj, block.mlp.down):  # residual branches start silent
                nn.init.zeros_(linear.weight)
        for projection in getattr(self.mtp, "projections", ()):
            nn.init.normal_(projection.weight, std=projection.in_features ** -0.5)

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def passes(self, idx: torch.Tensor, cache: KVCache | None = None, exit_threshold: float = 1.0
               ) -> tuple[list[torch.Tensor], int]:
        """The trunk's state after each pass over the blocks (each (B, T, d_model), before the final norm;
        one pass unless looped), and the passes run. With `exit_threshold` q < 1 and one new position,
        the passes stop at Q-exit (model/looped.py) and the cache's skipped passes take the last one's
        keys and values."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.shape.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's seq_len {self.shape.seq_len}")
        cos, sin = self.rope(start, T)
        x = self.streams.expand(self.embed(idx))
        states, steps, survive = [], self.shape.loop_steps, 1.0
        for step in range(steps):
            if cache is not None:
                cache.layer_offset = step * self.shape.depth
            for block in self.blocks:
                x = block(x, cos, sin, cache)
            states.append(self.streams.contract(x))
            if exit_threshold < 1 and T == 1 and step < steps - 1:
                survive = survive * (1 - float(self.loop.gate(self.final_norm(states[-1]))))
                if 1 - survive >= exit_threshold:
                    break
        if cache is not None:
            cache.layer_offset = 0
            cache.copy_pass(len(states) - 1, range(len(states), steps), self.shape.depth, T)
            cache.pos += T
        return states, len(states)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The trunk's last hidden states (B, T, d_model), before the final norm (a looped model's last pass)."""
        return self.passes(idx, cache)[0][-1]

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(z))

    def exit_logits(self, states: list[torch.Tensor], exit_threshold: float) -> torch.Tensor:
        """Each position's logits from the pass Q-exit stops it at (the last pass for q = 1 or no loop)."""
        if self.loop is None or exit_threshold >= 1 or len(states) < self.shape.loop_steps:
            return self.logits(states[-1])
        normed = [self.final_norm(z) for z in states]
        chosen = q_exit_steps(torch.stack([self.loop.gate(h) for h in normed]), exit_threshold)  # (B, T)
        picked = torch.stack(normed).gather(0, chosen[None, ..., None].expand(1, *normed[0].shape))[0]
        return self.lm_head(picked)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                reduction: str = "mean", exit_threshold: float = 1.0) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, the cross-entropy instead
        (with reduction 'mean' and a technique's objective on, that objective, model/objective.py; else the
        next token's, a looped model's from its last pass). `exit_threshold` < 1: logits from Q-exit's pass
        per position."""
        if self.collider is not None:
            self.collider.rows.kept = None  # only the loss of this forward may set which rows' gradients flow
        if targets is not None and reduction == "mean" and cache is None and self.objective is not None:
            return self.objective(self, idx, targets)
        states, _ = self.passes(idx, cache, exit_threshold)
        logits = self.exit_logits(states, exit_threshold)
        if targets is None:
            return logits
        logits = logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)

    def future_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every depth: [0] the next token's (B, T, V), [k] MTP depth k's (B, T - k, V), where
        position i predicts token i + 1 + k."""
        T = idx.shape[1]
        z = self.hidden(idx)
        out = [self.logits(z)]
        if self.mtp is None:
            return out
        cos, sin = self.rope(0, T)
        h = z
        for k in range(1, min(self.mtp.n_future, T - 1) + 1):
            if self.shape.mtp.kind == "heads":
                h_k = self.mtp.hidden(k, z, cos, sin)[:, :T - k]
            else:
                h = h_k = self.mtp.hidden(k, h[:, :T - k], self.embed(idx[:, k:]), cos[:T - k], sin[:T - k])
            out.append(self.mtp.logits(k, h_k, self.lm_head))
        return out

    def fit_gemms(self, device: torch.device, rows: int, dtype: torch.dtype) -> list[str]:
        """Fits the linears' GEMM hooks to a run on `device` with `rows` rows per micro-batch in `dtype` (an
        FP8 recipe measures its size rule there, model/fp4.py) and says what they do, for the start of the
        run: the precision path and rule, the filter."""
        s = self.shape
        notes = [s.precision.note(s.depth, device)] if s.precision is not None else []
        quantized: dict[int, tuple] = {}  # the quantizer's id -> (quantizer, its linears' GEMMs)
        for module in self.modules():
            quantizer = getattr(getattr(module, "gemm", None), "quantizer", None)
            if quantizer is not None:
                gemms = quantized.setdefault(id(quantizer), (quantizer, []))[1]
                gemms += linear_gemms(module.out_features, module.in_features, rows)
        for quantizer, gemms in quantized.values():
            notes += quantizer.fit(gemms, device, dtype)
        return notes + ([s.collider.note()] if self.collider is not None else [])

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by kind: embedding, head, block matrices (ternary or dense), norm gains."""
        head = 0 if self.lm_head.weight is self.embed.weight else self.lm_head.weight.numel()
        counts = {"embedding": self.embed.weight.numel(), "head": head,
                  "block_matrices": 0, "norm_gains": 0}
        for module in self.blocks.modules():
            if isinstance(module, (nn.Linear, TernaryLinear)):
                counts["block_matrices"] += module.in_features * module.out_features
            elif isinstance(module, nn.RMSNorm):
                counts["norm_gains"] += module.weight.numel()
        counts["norm_gains"] += self.final_norm.weight.numel()
        counts["mtp"] = sum(p.numel() for p in self.mtp.parameters()) if self.mtp is not None else 0
        counts["hyper_connections"] = sum(p.numel() for name, p in self.blocks.named_parameters()
                                          if "_residual." in name)
        counts["exit_gate"] = sum(p.numel() for p in self.loop.parameters()) if self.loop is not None else 0
        counts["total"] = sum(counts.values())
        return counts

    def is_ternary(self) -> bool:
        return any(isinstance(m, (BitLinear, TernaryLinear)) for m in self.modules())
