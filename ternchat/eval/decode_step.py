"""A compiled one-token decoding step: the model's per-token work as one static-shape graph.

At batch 1 a small model's decoding is bound by per-operator overhead, not by its matmuls: a token costs
hundreds of small PyTorch calls. `CompiledStep` runs the step of a plain GPT (no mHC, no loop) with shapes
that do not change from token to token, so `torch.compile` builds one graph per cache span: the position
is a tensor, and attention reads a fixed span of the preallocated KV cache (the next power of two above
the position, at least 128) under a mask of the positions filled so far, instead of a slice that grows
every step. It calls the model's own modules (norms, projections with their ternary kernels, MLP, head),
so it computes what `GPT.passes` computes with a cache, to float rounding (test). The graph only reads
the cache; the new position's keys and values come out and are written in place after it. The prompt
still runs eagerly and fills the same cache.
"""

from __future__ import annotations

import torch

from ternchat.model.bitlinear import set_kernel
from ternchat.model.gpt import GPT, KVCache, apply_rotary

MIN_SPAN = 128


def prepare_decoding(model: GPT, kernel: str = "auto", compile: bool = False) -> "CompiledStep | None":
    """Set the ternary kernel of `model` ("auto": int8 on a CPU, where it beats the float kernel, and float on a
    GPU, where torch._int_mm needs more than 16 rows) and, with `compile`, make its compiled step (None when not
    asked for or when the model is not plain)."""
    if kernel == "auto":
        kernel = "int8" if model.embed.weight.device.type == "cpu" else "float"
    set_kernel(model, kernel)
    return CompiledStep(model) if compile and supports(model) else None


def supports(model: GPT) -> bool:
    """Whether the step covers this model: the plain residual and one pass."""
    return model.shape.mhc_streams == 1 and model.shape.loop_steps == 1


class CompiledStep:
    """`step(token, cache)`: the next-token logits (vocab,) after feeding `token` at `cache.pos`; the cache must
    span the model's whole context (`KVCache(shape, 1, seq_len, ...)`)."""

    def __init__(self, model: GPT, compile: bool = True):
        if not supports(model):
            raise ValueError("the compiled decoding step covers plain models (no mHC streams, no LoopLM passes)")
        self.model = model
        self.positions = torch.arange(model.shape.seq_len, device=model.rope_cos.device)
        self._run = torch.compile(self._step, dynamic=False) if compile else self._step
        spans = (model.shape.seq_len // MIN_SPAN).bit_length() + 1  # one graph per span
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, spans)

    @torch.no_grad()
    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        if cache.max_len != self.model.shape.seq_len:
            raise ValueError(f"the compiled step needs a cache of the model's context, {self.model.shape.seq_len}")
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.pos + 1} requested")
        device = cache.k.device
        pos = torch.tensor([cache.pos], device=device)
        span = self.span(cache.pos)
        logits, keys, values = self._run(torch.tensor([[token]], device=device), pos, cache.k[:, :, :, :span],
                                         cache.v[:, :, :, :span])
        cache.k.index_copy_(3, pos, keys.to(cache.k.dtype))  # the new position of every layer, written in place
        cache.v.index_copy_(3, pos, values.to(cache.v.dtype))
        cache.pos += 1
        return logits

    def span(self, pos: int) -> int:
        """The cache positions attention reads for a token at `pos`: the next power of two above it (at least
        128), capped at the context. Each span is its own static graph, compiled the first time it is needed,
        so a short conversation does not pay for attention over the whole context."""
        return min(self.model.shape.seq_len, max(MIN_SPAN, 1 << pos.bit_length()))

    def _step(self, token: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, and the new position's keys and values of every layer (depth, 1, heads, 1, head_dim). The
        cache is only read here: a write into it inside the graph makes inductor sweep the whole cache."""
        model = self.model
        cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)
        earlier = (self.positions[:keys.shape[3]] < pos)[None, None, None, :]
        x = model.embed(token)
        new_keys, new_values = [], []
        for i, block in enumerate(model.blocks):
            attn = block.attn
            h = block.attn_norm(x)
            q, k, v = (proj(h).view(1, 1, attn.n_heads, attn.head_dim)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = apply_rotary(attn.q_norm(q), cos, sin), apply_rotary(attn.k_norm(k), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, heads, 1, head_dim)
            # softmax attention over the cached positions and the new one, without joining them into one tensor
            scale = attn.head_dim ** -0.5
            cached = (q @ keys[i].transpose(-1, -2).to(q.dtype)).float() * scale
            cached = cached.masked_fill(~earlier, float("-inf"))
            own = (q * k).sum(dim=-1, keepdim=True).float() * scale
            weights = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)
            y = (weights[..., :-1].to(q.dtype) @ values[i].to(q.dtype)) + weights[..., -1:].to(q.dtype) * v
            x = x + attn.o_proj(attn.sub_norm(y.transpose(1, 2).reshape(1, 1, -1)))
            x = x + block.mlp(block.mlp_norm(x))
            new_keys.append(k)
            new_values.append(v)
        return model.logits(x)[0, -1], torch.stack(new_keys), torch.stack(new_values)
