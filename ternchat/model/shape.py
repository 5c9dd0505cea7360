"""The model's shape: the plain GPT's dimensions and knobs, and one optional shape per technique, each
defined and built from its config section by the technique's own module (None when it is off).
Checkpoints and packed files store it as `to_dict()`; `from_dict` also reads the flat layout that
files written before the technique shapes used (`mtp_kind`, `mhc_streams`, `loop_steps`, ...)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ternchat.config import Config
from ternchat.model.collider import ColliderShape
from ternchat.model.fp4 import PrecisionShape
from ternchat.model.looped import LoopShape
from ternchat.model.mhc import HyperShape
from ternchat.model.mtp import MTPShape

FLAT_PREFIXES = ("mtp", "mhc", "loop", "fp4", "collider")  # the flat layout's technique fields: mtp_kind, ...
TECHNIQUE_SHAPES = {"mtp": MTPShape, "mhc": HyperShape, "loop": LoopShape, "precision": PrecisionShape,
                    "collider": ColliderShape}


@dataclass(frozen=True)
class GPTShape:
    """The plain model's dimensions and knobs, and the shape of each technique that is on (None when off),
    each built by its own module from its config section."""
    vocab_size: int
    depth: int
    d_model: int
    n_heads: int
    d_ff: int
    seq_len: int
    quant: str
    mlp: str = "relu2"  # relu2, relu2_glu (HF BitNet) or swiglu (llama.cpp's bitnet graph)
    qk_norm: bool = True
    tie_embeddings: bool = False
    mtp: MTPShape | None = None  # multi-token prediction heads or modules (model/mtp.py)
    mhc: HyperShape | None = None  # hyper-connections over residual streams (model/mhc.py)
    loop: LoopShape | None = None  # passes over the blocks with an exit gate (model/looped.py)
    precision: PrecisionShape | None = None  # GEMMs under an FP4/FP8 recipe, training only (model/fp4.py)
    collider: ColliderShape | None = None  # token filtering, training only (model/collider.py)

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "GPTShape":
        m = cfg.model
        return cls(vocab_size, m.depth, m.d_model, m.n_heads, m.d_ff or 4 * m.d_model, m.seq_len, m.quant,
                   mlp=m.mlp, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings,
                   mtp=MTPShape.from_config(cfg.mtp), mhc=HyperShape.from_config(cfg.mhc),
                   loop=LoopShape.from_config(cfg.loop), precision=PrecisionShape.from_config(cfg.fp4),
                   collider=ColliderShape.from_config(cfg.collider))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTShape":
        """The shape `to_dict` wrote (checkpoints, packed files), or one of the flat layout files written
        before techniques had shapes of their own (`mtp_kind`, `mhc_streams`, ...)."""
        if any("_" in key and key.split("_")[0] in FLAT_PREFIXES for key in d):
            d = _nested(d)
        techniques = {name: kind(**d[name]) if d.get(name) is not None else None
                      for name, kind in TECHNIQUE_SHAPES.items()}
        return cls(**{**d, **techniques})

    def for_inference(self) -> "GPTShape":
        """The same model without the training-only GEMM hooks (precision recipe, token filter)."""
        return dataclasses.replace(self, precision=None, collider=None)

    @property
    def loop_steps(self) -> int:
        return self.loop.steps if self.loop is not None else 1

    @property
    def mhc_streams(self) -> int:
        return self.mhc.streams if self.mhc is not None else 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _nested(flat: dict) -> dict:
    """A shape dict of the flat layout as the nested one."""
    plain = {k: v for k, v in flat.items() if k.split("_")[0] not in FLAT_PREFIXES}
    get = flat.get
    if get("mtp_kind", "none") != "none":
        plain["mtp"] = dict(kind=flat["mtp_kind"], n_future=flat["mtp_n_future"], weights=flat["mtp_weights"])
    if get("mhc_streams", 1) > 1:
        plain["mhc"] = dict(streams=flat["mhc_streams"], sinkhorn_iters=get("mhc_sinkhorn_iters", 20),
                            constraint=get("mhc_constraint", "sinkhorn"), gate_init=get("mhc_gate_init", 0.01))
    if get("loop_steps", 1) > 1:
        plain["loop"] = dict(steps=flat["loop_steps"], stage=get("loop_stage", "joint"),
                             entropy_beta=get("loop_entropy_beta", 0.05), gate_k=get("loop_gate_k", 50.0),
                             gate_gamma=get("loop_gate_gamma", 0.005),
                             exit_threshold=get("loop_exit_threshold", 1.0))
    if get("fp4_recipe", "none") != "none":
        plain["precision"] = dict(recipe=flat["fp4_recipe"], bf16_first=get("fp4_bf16_first", 0),
                                  bf16_last=get("fp4_bf16_last", 0), head=get("fp4_head", False),
                                  hadamard=get("fp4_hadamard", 0), seed=get("fp4_seed", 0))
    if get("collider_filter_frac", 0.0) > 0:
        plain["collider"] = dict(filter_frac=flat["collider_filter_frac"], reference=get("collider_reference", ""))
    return plain
