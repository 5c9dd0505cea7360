"""The optimizer factory: parameter groups -> optimizers, behind one step()/state_dict() face.

2-D matrices inside the transformer blocks go to the matrix optimizer (`optim.matrix_optimizer`:
Muon, FOAM or AdamW; with `use_galore`, GUM for Muon, one parameter group per transformer block
since GUM samples whole blocks, and GaLore for AdamW; with `use_8bit_optim`, int8 Muon/GUM
momentum); the token embedding, the LM head and the norm gains go to AdamW (8-bit through
bitsandbytes with `adamw_8bit`, or FOAM for embedding and head with `foam_embed_head`, there with
scale 1 so their learning rates mean what they mean for AdamW),
each with its own learning rate. The trainer sees a `CombinedOptimizer` and nothing else, so new
optimizers plug in here without touching the loop.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ternchat.config import ConfigError, OptimConfig
from ternchat.optim.foam import FOAM
from ternchat.optim.galore import GUM, GaLoreAdamW
from ternchat.optim.muon import Muon
from ternchat.optim.distributed import OwnedMatrices, Ranks, full_state, is_sharded, shard_state


class CombinedOptimizer:
    """Several optimizers stepped together; `lr_scale` multiplies every group's base LR."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
                group["base_weight_decay"] = group["weight_decay"]

    def set_schedule(self, lr_scale: float, weight_decay_scale: float = 1.0) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                group["weight_decay"] = group["base_weight_decay"] * weight_decay_scale

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        """Whole tensors in the single-process layout, however the run is sharded (a collective then)."""
        return [opt.state_dict() if isinstance(opt, OwnedMatrices) else full_state(opt.state_dict())
                for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(states)} optimizer states, this run has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            if not isinstance(opt, OwnedMatrices):
                state = shard_state(state, [p for g in opt.param_groups for p in g["params"]])
            opt.load_state_dict(state)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors."""
        return sum(t.numel() * t.element_size() for opt in self.optimizers for s in opt.state.values()
                   for t in s.values() if torch.is_tensor(t))


def _adamw_for(params_groups: list[dict], cfg: OptimConfig, eight_bit: bool) -> torch.optim.Optimizer:
    betas = (cfg.beta1, cfg.beta2)
    if eight_bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("warning: optim.adamw_8bit needs bitsandbytes (pip install bitsandbytes); using fp32 AdamW")
        else:
            return bnb.optim.AdamW8bit(params_groups, betas=betas, eps=1e-8)
    return torch.optim.AdamW(params_groups, betas=betas, eps=1e-8)


def build_matrix_optimizer(layers: list[list[torch.Tensor]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of the block matrices, given as one list per transformer block."""
    matrices = [p for layer in layers for p in layer]
    bits = 8 if cfg.use_8bit_optim else 32
    galore = dict(rank=cfg.galore_rank, update_freq=cfg.galore_update_freq, min_dim=cfg.galore_min_dim,
                  oversample=cfg.galore_oversample, power_iters=cfg.galore_power_iters, seed=cfg.seed)
    if cfg.matrix_optimizer == "muon" and cfg.use_galore:
        return GUM([dict(params=ps) for ps in layers], lr=cfg.lr_matrix, momentum=cfg.muon_momentum,
                   weight_decay=cfg.weight_decay, full_rank_layers=cfg.gum_full_rank_layers, state_bits=bits,
                   block_size=cfg.block_size_8bit, stochastic_rounding=cfg.stochastic_rounding, **galore)
    if cfg.matrix_optimizer == "muon":
        return Muon(matrices, lr=cfg.lr_matrix, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                    state_bits=bits, block_size=cfg.block_size_8bit, stochastic_rounding=cfg.stochastic_rounding,
                    seed=cfg.seed)
    if cfg.use_galore and cfg.matrix_optimizer == "adamw":
        return GaLoreAdamW(matrices, lr=cfg.lr_matrix, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                           scale=cfg.galore_scale, **galore)
    if cfg.use_galore:
        raise ConfigError("optim.use_galore works with matrix_optimizer = 'muon' (GUM) or 'adamw' (GaLore), "
                          f"not {cfg.matrix_optimizer!r}")
    if cfg.matrix_optimizer == "foam":
        return FOAM(matrices, lr=cfg.lr_matrix, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                    level=cfg.foam_level, scale=cfg.foam_scale)
    return torch.optim.AdamW([dict(params=matrices, lr=cfg.lr_matrix, weight_decay=cfg.weight_decay)],
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def build_optimizer(model: nn.Module, cfg: OptimConfig, ranks: Ranks = Ranks()) -> CombinedOptimizer:
    """Block matrices -> Muon / GUM / GaLore-AdamW / FOAM / AdamW (each matrix stepped whole by one owner
    rank in a distributed or sharded run); embedding, head, gains -> AdamW or FOAM."""
    gains = []
    layers: dict[str, list[torch.Tensor]] = {}  # block -> its matrices (GUM samples whole blocks)
    for name, p in model.named_parameters():
        if p is model.embed.weight or p is model.lm_head.weight:
            continue
        if p.ndim == 2:  # the trunk's blocks, and those of multi-token prediction
            layers.setdefault(re.match(r"(.*?\.\d+)\.", name).group(1), []).append(p)
        else:
            gains.append(p)
    if model.lm_head.weight is model.embed.weight:  # tied: the head's rate (the embedding's is far too large)
        embed_head = [dict(params=[model.embed.weight], lr=cfg.lr_head, weight_decay=0.0)]
    else:
        embed_head = [dict(params=[model.embed.weight], lr=cfg.lr_embed, weight_decay=0.0),
                      dict(params=[model.lm_head.weight], lr=cfg.lr_head, weight_decay=0.0)]
    gains_group = [dict(params=gains, lr=cfg.lr_scalar, weight_decay=0.0)]
    if ranks.distributed or is_sharded(model):
        matrix_opt = OwnedMatrices(list(layers.values()), lambda ls: build_matrix_optimizer(ls, cfg), ranks)
    else:
        matrix_opt = build_matrix_optimizer(list(layers.values()), cfg)
    if cfg.foam_embed_head:
        others = [FOAM(embed_head, betas=(cfg.beta1, cfg.beta2), level=cfg.foam_level),
                  torch.optim.AdamW(gains_group, betas=(cfg.beta1, cfg.beta2), eps=1e-8)]
    elif cfg.adamw_8bit:
        others = [_adamw_for(embed_head, cfg, True), torch.optim.AdamW(gains_group, betas=(cfg.beta1, cfg.beta2))]
    else:
        others = [torch.optim.AdamW(embed_head + gains_group, betas=(cfg.beta1, cfg.beta2), eps=1e-8)]
    return CombinedOptimizer([matrix_opt, *others])
