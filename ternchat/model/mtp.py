"""Multi-token prediction: output blocks beside the next-token head that predict tokens further ahead.

- `heads` (Gloeckle et al. 2024, arXiv 2404.19737): `n_future` independent heads on the trunk's last
  hidden state z (before the final norm); head j is one transformer block (ternary like the trunk)
  and its own RMSNorm, followed by the shared unembedding, and predicts token t+1+j. The loss is
  sum_j w_j CE_j, j = 0 the next-token head. As in the paper, the heads run one at a time: forward,
  loss, backward to z (accumulating dz and the heads' gradients), logits freed, next head; the trunk
  then gets one backward from dz. Peak memory so grows by one vocabulary-sized logit tensor, not
  n + 1 of them, and the gradients are those of the summed loss (`SequentialHeadLoss`).
- `modules` (DeepSeek-V3, arXiv 2412.19437 section 2.2): sequential modules; depth k combines
  RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i) (embedding first, as the released weights do) by a
  linear projection 2d -> d, runs one transformer block and predicts t_{i+k+1} through its own
  RMSNorm and the shared unembedding, h^0 being the trunk's last hidden state. The loss adds
  (lambda / D) sum_k CE_k to the next-token loss. Embedding and unembedding are shared.

Training feeds the true tokens (never drafted ones). The next-token head is the model's own, so
validation bits per byte of a model with MTP compare with one without; `last_losses` keeps each
depth's cross-entropy of the last training forward. At inference the same blocks draft tokens for
self-speculative decoding (`eval/engine.py`): a head needs only the trunk's states, a module also
the tokens it predicts from, and each keeps its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternchat.model.bitlinear import make_linear

@dataclass(frozen=True)
class MTPShape:
    kind: str  # heads or modules
    n_future: int  # tokens predicted beyond the next one
    weights: tuple[float, ...]  # heads: one per depth from the next token; modules: (lambda,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(self.weights))  # a list after a JSON round trip

    @classmethod
    def from_config(cls, mtp) -> "MTPShape | None":
        """The shape of the config's `[mtp]` section; None when it is off."""
        if mtp.kind == "none":
            return None
        return cls(mtp.kind, mtp.n_future, tuple(mtp.weights) if mtp.kind == "heads" else (mtp.module_weight,))


Factory = Callable[[int], nn.Module]  # block(layer) or norm(dim), from the model's layer factory
Term = Callable[[torch.Tensor], torch.Tensor]  # the trunk's state -> a loss, or -> the state MTP reads


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class SequentialHeadLoss(torch.autograd.Function):
    """sum_j term_j(z) with each term's forward and backward done in turn inside the forward, so only
    one term's activations (its logits) are alive at a time; the backward scales the gradients that
    were accumulated for z and for `params` (the parameters the terms use). Each term's value is
    appended to `record`."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, terms: Sequence[Callable[[torch.Tensor], torch.Tensor]], record: list,
                *params: torch.Tensor) -> torch.Tensor:
        z_in = z.detach().requires_grad_()
        dz = torch.zeros_like(z)
        grads = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), device=z.device, dtype=torch.float32)
        with torch.enable_grad():
            for term in terms:
                loss = term(z_in)
                found = torch.autograd.grad(loss, [z_in, *params], allow_unused=True)
                dz += found[0]
                for acc, g in zip(grads, found[1:]):
                    if g is not None:
                        acc += g
                total += loss.detach().float()
                record.append(loss.detach())
                del loss, found  # this term's logits go before the next term's are made
        ctx.save_for_backward(dz, *grads)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        dz, *grads = ctx.saved_tensors
        return (dz * grad_total.to(dz.dtype), None, None, *(g * grad_total.to(g.dtype) for g in grads))


def _sequential(z: torch.Tensor, terms: list, record: list, params: list[torch.Tensor]) -> torch.Tensor:
    return SequentialHeadLoss.apply(z, terms, record, *params)


class MTPHeads(nn.Module):
    def __init__(self, shape, block: Factory, norm: Factory):
        super().__init__()
        self.n_future, self.weights = shape.mtp.n_future, shape.mtp.weights
        if len(self.weights) != self.n_future + 1:
            raise ValueError(f"heads need n_future + 1 = {self.n_future + 1} loss weights, got {len(self.weights)}")
        self.blocks = nn.ModuleList(block(0) for _ in range(self.n_future))
        self.norms = nn.ModuleList(norm(shape.d_model) for _ in range(self.n_future))
        self.last_losses: list[torch.Tensor] = []
        # autograd.grad inside a forward runs eagerly while the trunk stays compiled. Wrapped here, not at
        # import: torch.compiler.disable imports dynamo, seconds that every process would pay otherwise.
        self._sequential = torch.compiler.disable(_sequential)

    def hidden(self, j: int, z: torch.Tensor, cos, sin, cache=None) -> torch.Tensor:
        """Head j's block output (j from 1: it predicts t+1+j) at every position of z."""
        return self.blocks[j - 1](z, cos, sin, cache)

    def logits(self, j: int, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.norms[j - 1](h))

    def loss(self, z: torch.Tensor, targets: torch.Tensor, next_token: Term, last: Term, lm_head: nn.Module,
             cos: torch.Tensor, sin: torch.Tensor, shared: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the next-token objective `next_token(z)` and the heads' losses on `last(z)`
        (z the trunk's state; a looped model's passes' states); `shared` are the parameters outside the
        heads that the terms use (final norm, head, exit gate)."""
        T = targets.shape[1]
        terms = [lambda h: self.weights[0] * next_token(h)]
        for j in range(1, min(self.n_future, T - 1) + 1):
            terms.append(lambda h, j=j: self.weights[j] * _cross_entropy(
                self.logits(j, self.hidden(j, last(h), cos, sin), lm_head)[:, :T - j], targets[:, j:]))
        record: list[torch.Tensor] = []
        if torch.is_grad_enabled():
            params = [p for p in [*shared, *self.parameters()] if p.requires_grad]
            total = self._sequential(z, terms, record, params)
        else:
            record = [term(z) for term in terms]
            total = torch.stack(record).sum()
        # detached tensors, not floats: a float would make every training step wait for the device
        self.last_losses = [r / w if w else torch.full_like(r, float("nan")) for r, w in zip(record, self.weights)]
        return total


class MTPModules(nn.Module):
    def __init__(self, shape, block: Factory, norm: Factory):
        super().__init__()
        self.n_future, self.weight = shape.mtp.n_future, float(shape.mtp.weights[0])
        d = shape.d_model
        self.embed_norms = nn.ModuleList(norm(d) for _ in range(self.n_future))
        self.hidden_norms = nn.ModuleList(norm(d) for _ in range(self.n_future))
        self.projections = nn.ModuleList(make_linear(2 * d, d, shape.quant) for _ in range(self.n_future))
        self.blocks = nn.ModuleList(block(0) for _ in range(self.n_future))
        self.norms = nn.ModuleList(norm(d) for _ in range(self.n_future))
        self.last_losses: list[torch.Tensor] = []

    def hidden(self, k: int, previous: torch.Tensor, embedded: torch.Tensor, cos, sin, cache=None) -> torch.Tensor:
        """h^k from h^{k-1} (`previous`) and the embeddings of the tokens k ahead (`embedded`), same positions."""
        i = k - 1
        joined = torch.cat([self.embed_norms[i](embedded), self.hidden_norms[i](previous)], dim=-1)
        return self.blocks[i](self.projections[i](joined), cos, sin, cache)

    def logits(self, k: int, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.norms[k - 1](h))

    def loss(self, z: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, next_token: Term, last: Term,
             embed: nn.Module, lm_head: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`next_token(z)` plus (lambda / D) x the modules' losses, module 1 reading h^0 = `last(z)`."""
        T = targets.shape[1]
        main = next_token(z)
        depth_losses, h = [], last(z)
        for k in range(1, min(self.n_future, T - 1) + 1):
            h = self.hidden(k, h[:, :T - k], embed(idx[:, k:]), cos[:T - k], sin[:T - k])
            depth_losses.append(_cross_entropy(self.logits(k, h, lm_head), targets[:, k:]))
        self.last_losses = [main.detach()] + [d.detach() for d in depth_losses]
        if not depth_losses:
            return main
        return main + self.weight / self.n_future * torch.stack(depth_losses).sum()


def make_mtp(shape, block: Factory, norm: Factory) -> nn.Module | None:
    """The layer factory's MTP switch: None when off (the model is then exactly the plain GPT)."""
    if shape.mtp is None:
        return None
    if shape.mtp.kind == "heads":
        return MTPHeads(shape, block, norm)
    if shape.mtp.kind == "modules":
        return MTPModules(shape, block, norm)
    raise ValueError(f"unknown mtp kind {shape.mtp.kind!r}; choose none, heads or modules")
