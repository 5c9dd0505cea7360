"""The training objectives: what `GPT.forward(idx, targets)` minimizes while training, chosen by one factory.

The plain model's objective is the next token's cross-entropy, which its forward computes itself
(`make_objective` returns None). A technique that changes the loss enters here:
- Collider (model/collider.py): the per-token cross-entropy, averaged over the kept tokens only, and
  the row filter set for the backward pass;
- LoopLM (model/looped.py): the exit objective over the passes' states (stage I: expected loss under
  the exit distribution minus its entropy; stage II: the gate's loss alone);
- MTP (model/mtp.py): the next-token term (either of the above, or the plain one) weighted together with
  each extra depth's cross-entropy; heads read the trunk's last state, modules also the tokens ahead.
Collider filters the plain next-token loss only, so it does not combine with MTP or a loop.
`objective_metrics` reads what the last training forward measured besides its value.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = logits.float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


class TrainingObjective:
    """The loss of a model with MTP, a loop or Collider on, from its trunk's states (model.passes)."""

    def __call__(self, model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        states, _ = model.passes(idx)
        looped = model.loop is not None
        z = torch.stack(states) if looped else states[0]

        def next_token(z: torch.Tensor) -> torch.Tensor:
            if looped:
                return model.loop.loss(list(z.unbind(0)), targets, model.final_norm, model.lm_head)
            if model.collider is not None and torch.is_grad_enabled():
                per_token = _cross_entropy(model.logits(z), targets, reduction="none")
                return model.collider.loss(per_token, idx, targets)
            return _cross_entropy(model.logits(z), targets)

        def last(z: torch.Tensor) -> torch.Tensor:
            return z[-1] if looped else z

        if model.mtp is None or (looped and model.loop.stage == "gate"):  # stage II trains the gate alone
            return next_token(z)
        cos, sin = model.rope(0, idx.shape[1])
        if model.shape.mtp.kind == "heads":
            shared = [*model.final_norm.parameters(), *model.lm_head.parameters(),
                      *(model.loop.parameters() if looped else ())]
            return model.mtp.loss(z, targets, next_token, last, model.lm_head, cos, sin, shared)
        return model.mtp.loss(z, idx, targets, next_token, last, model.embed, model.lm_head, cos, sin)


Objective = Callable[..., torch.Tensor]


def make_objective(shape) -> Objective | None:
    """The loss factory: None for the plain next-token cross-entropy, else the techniques' objective."""
    if shape.mtp is None and shape.loop is None and shape.collider is None:
        return None
    if shape.collider is not None and (shape.mtp is not None or shape.loop is not None):
        raise ValueError("Collider filters the plain next-token loss; it does not combine with MTP or a loop")
    return TrainingObjective()


def objective_metrics(model) -> dict[str, float | list[float]]:
    """What the last training forward's objective measured besides its value (metrics.jsonl): each MTP
    depth's loss, each loop pass's next-token loss and the mean exit pass under the exit distribution,
    and the loss over all tokens before Collider's filter."""
    out: dict[str, float | list[float]] = {}
    if model.mtp is not None and model.mtp.last_losses:
        out["mtp_depth_losses"] = [float(x) for x in model.mtp.last_losses]
    if model.loop is not None and model.loop.last_exit_step is not None:
        out["loop_pass_losses"] = [float(x) for x in model.loop.last_losses]
        out["loop_mean_exit_pass"] = float(model.loop.last_exit_step)
    if model.collider is not None and model.collider.last_full_loss is not None:
        out["collider_all_tokens_loss"] = float(model.collider.last_full_loss)
    return out
