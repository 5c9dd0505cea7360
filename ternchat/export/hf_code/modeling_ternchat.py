"""A ternchat GPT for Hugging Face `transformers` (remote code, needs only torch and transformers).

Written by `ternchat export --format hf` beside `config.json` and `model.safetensors`; load it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It computes what ternchat's
inference model computes, op for op: pre-norm blocks with SubLN before the output projections,
ternary linears (BitNet b1.58: int8 absmax activations per token times {-1, 0, +1} codes times the
matrix's absmean scale beta), optional QK-norm, RoPE on the two halves of each head, causal SDPA and
a full-precision head. Codes are stored two bits each, four to a byte, in transformers' BitNet layout
(value i of a byte is row r + i * ceil(out / 4)); they are unpacked once, at the first forward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_ternchat import TernchatConfig
except ImportError:  # imported as a top-level module
    from configuration_ternchat import TernchatConfig


# transformers 5.25 renamed the KV cache from `past_key_values` to `cache`, as generate()'s keyword and as the
# output's field; the model takes either keyword and fills the field its transformers declares
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def unpack_codes(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """int8 codes (rows, in) from the 2-bit packed (ceil(rows / 4), in) uint8 tensor."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)]
    return torch.cat(parts, dim=0)[:rows]


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


class TernaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.zeros((out_features + 3) // 4, in_features, dtype=torch.uint8))
        self.register_buffer("beta", torch.ones((), dtype=torch.float32))
        self._weight: torch.Tensor | None = None

    def weight_values(self) -> torch.Tensor:
        if self._weight is None or self._weight.device != self.packed.device:
            self._weight = unpack_codes(self.packed, self.out_features).float() * self.beta.float()
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantize_activation(x.float()).to(x.dtype)
        return F.linear(x_q, self.weight_values().to(x.dtype))


def make_linear(config: TernchatConfig, in_features: int, out_features: int) -> nn.Module:
    if config.quant == "ternary":
        return TernaryLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos and sin (B, T, D / 2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TernchatConfig, layer: int):
        super().__init__()
        d = config.hidden_size
        self.layer, self.n_heads, self.head_dim = layer, config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = (make_linear(config, d, d) for _ in range(3))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.sub_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = make_linear(config, d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(self.sub_norm(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: TernchatConfig):
        super().__init__()
        d, d_ff = config.hidden_size, config.intermediate_size
        self.kind = config.mlp
        self.gate = make_linear(config, d, d_ff) if config.mlp != "relu2" else None
        self.up = make_linear(config, d, d_ff)
        self.sub_norm = RMSNorm(d_ff, config.rms_norm_eps)
        self.down = make_linear(config, d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            hidden = F.relu(self.up(x)).square()
        elif self.kind == "swiglu":
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = F.relu(self.gate(x)).square() * self.up(x)
        return self.down(self.sub_norm(hidden))


class Block(nn.Module):
    def __init__(self, config: TernchatConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.hidden_size, config.rms_norm_eps), Attention(config, layer)
        self.mlp_norm, self.mlp = RMSNorm(config.hidden_size, config.rms_norm_eps), MLP(config)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class TernchatPreTrainedModel(PreTrainedModel):
    config_class = TernchatConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the exported file


class TernchatModel(TernchatPreTrainedModel):
    def __init__(self, config: TernchatConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed here, not kept as a buffer: transformers builds modules on the meta device and would not
        # restore a buffer that the weights file does not hold
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        angles = positions.float()[..., None] * (1.0 / self.config.rope_theta ** exponents)
        return angles.cos(), angles.sin()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(position_ids)
        mask = None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if start > 0 or padded:  # new queries see the cache and the causal part of themselves
            mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)[None, None]
            if padded:
                mask = mask & attention_mask[:, None, None, -(start + T):].bool()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, past_key_values, mask)
        return self.final_norm(x)


class TernchatForCausalLM(TernchatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: TernchatConfig):
        super().__init__(config)
        self.model = TernchatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, cache: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
