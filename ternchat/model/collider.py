"""Collider (arXiv 2502.00340): token filtering whose savings reach the backward pass.

A token filter of the Rho-1 family (arXiv 2404.07965) scores every token of the batch: its loss under
the model being trained or, when a reference model is given, its excess loss (training loss minus the
reference model's loss). The top (1 - filter_frac) tokens by score are kept; the loss is the mean over
them. Masking the loss alone saves nothing, and with attention the filtered tokens' gradients would come
back dense through the keys and values of kept tokens. Collider therefore drops the filtered tokens'
activation gradients at every layer: this module sets the kept rows on the model's `RowFilter`, and every
linear (model/linear.py) treats the filtered rows of its output gradient as zero, so its input gradient
is computed for the kept rows only and its weight-gradient GEMM runs densely over the gathered kept rows.
The forward pass is unchanged. For a model without attention (tokens independent) this is exactly the
masked-loss gradient; with attention it is an approximation that drops what reaches the weights through
filtered tokens' keys and values, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ternchat.model.linear import RowFilter


class Collider:
    """The token filter of one model and the row filter it shares with the model's linears."""

    def __init__(self, filter_frac: float, reference_run: str = ""):
        if not 0 <= filter_frac < 1:
            raise ValueError(f"filter_frac must be in [0, 1), got {filter_frac}")
        self.filter_frac = filter_frac
        self.reference_run = reference_run
        self.rows = RowFilter()
        self.reference: torch.nn.Module | None = None  # `reference_run`'s model: the training side loads it
        self.last_full_loss: torch.Tensor | None = None  # detached, for metrics: no device sync per step

    def kept_count(self, total: int) -> int:
        return max(1, total - int(round(self.filter_frac * total)))

    def reference_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each token's loss under the reference model (frozen, on idx's device)."""
        if self.reference is None:
            raise RuntimeError(f"Collider scores by the excess loss over {self.reference_run}, but no reference model "
                               "was handed to it (training loads it: train/trainer.py, build_training)")
        with torch.no_grad():
            logits = self.reference(idx).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")

    def loss(self, per_token: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the kept tokens of `per_token` (flat, one per row); sets the row filter that
        the next backward pass uses."""
        score = per_token.detach()
        if self.reference_run:
            score = score - self.reference_loss(idx, targets)
        kept = torch.topk(score, self.kept_count(score.numel()), sorted=False).indices.sort().values
        self.rows.kept, self.rows.total = kept, score.numel()
        self.last_full_loss = per_token.detach().mean()
        return per_token.index_select(0, kept).mean()


@dataclass(frozen=True)
class ColliderShape:
    filter_frac: float  # share of tokens filtered (> 0)
    reference: str = ""  # run folder of Rho-1's reference model; empty = score by the loss

    @classmethod
    def from_config(cls, c) -> "ColliderShape | None":
        """The shape of the config's `[collider]` section; None when it is off."""
        return cls(c.filter_frac, c.reference) if c.enabled else None

    def note(self) -> str:
        score = f"excess loss over {self.reference}" if self.reference else "loss"
        return (f"Collider: the {self.filter_frac:.0%} of tokens with the lowest {score} are filtered; their "
                "gradients are dropped at every linear")


def make_collider(shape: ColliderShape | None) -> Collider | None:
    """The layer factory's choice: a Collider when filtering is on, else None (no hooks, no cost)."""
    return Collider(shape.filter_frac, shape.reference) if shape is not None and shape.filter_frac > 0 else None

