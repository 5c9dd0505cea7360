"""LoopLM (Ouro; Zhu et al., arXiv 2510.25741, and its released `modeling_ouro.py`): one stack of
blocks applied `steps` times with shared weights, and a learned exit.

After pass t (1..T) the model reads out its state h_t: the final norm and the shared LM head give
logits, and the exit gate gives lambda_t = sigmoid(w . norm(h_t) + b) per token. The exit
distribution is p(t) = lambda_t prod_{j<t} (1 - lambda_j) for t < T and p(T) = prod_{j<T} (1 - lambda_j),
the mass left at the last pass (`exit_distribution`).

- Stage I (`stage = "joint"`): LM and gate together on L = sum_t p(t) L_t - beta H(p), with L_t the
  next-token cross-entropy of pass t's logits and H(p) the entropy of the exit distribution (not of
  the lambdas), per token, averaged over tokens (`joint_loss`).
- Stage II (`stage = "gate"`): the LM is frozen (its parameters get no gradients; the passes run
  without autograd) and only the gate trains. Per token, the improvement of pass t over pass t - 1 is
  I_t = max(0, L_{t-1} - L_t) from the detached losses, the target to continue past pass t - 1 is
  w_t = sigmoid(k (I_t - gamma)), and the loss is the binary cross-entropy between the continue
  probability 1 - lambda_{t-1} and w_t, averaged over t = 2..T and tokens (`gate_loss`).
- Inference (Q-exit, `eval/engine.py`): a token stops at the first pass whose cumulative exit
  probability reaches q; q = 1 always runs all T passes (fixed depth). The KV cache has one slot per
  pass and layer.

The passes run on the residual state without re-normalizing it between passes (the paper's
composition F^(t) = head o M^L o ... o M^L o emb; the released code feeds norm(h_t) to the next pass,
which would cut mHC's streams, which must persist). The gate starts at w = 0, b = 0, so lambda = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LoopShape:
    steps: int  # passes over the blocks (> 1)
    stage: str = "joint"  # joint (stage I) or gate (stage II)
    entropy_beta: float = 0.05
    gate_k: float = 50.0
    gate_gamma: float = 0.005
    exit_threshold: float = 1.0  # Q-exit's q at generation; 1 = every pass

    @classmethod
    def from_config(cls, loop) -> "LoopShape | None":
        """The shape of the config's `[loop]` section; None when it is off."""
        if not loop.enabled:
            return None
        return cls(loop.steps, loop.stage, loop.entropy_beta, loop.gate_k, loop.gate_gamma, loop.exit_threshold)


class ExitGate(nn.Module):
    """lambda_t = sigmoid(w . h + b) per token, h the normalized state (1-D parameters: AdamW's group)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.bias = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no 0-d parameters

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(h.float() @ self.weight.float() + self.bias.float())


def exit_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """p(t) (T, ...) from the gates lambda_t (T, ...): exit at t having continued before; the last pass
    takes the remaining mass."""
    survive = torch.cumprod(1 - lambdas, dim=0)
    before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]])
    return torch.cat([lambdas[:-1] * before[:-1], before[-1:]])


def joint_loss(step_losses: torch.Tensor, lambdas: torch.Tensor, beta: float) -> torch.Tensor:
    """Stage I: mean over tokens of sum_t p(t) L_t - beta H(p); step_losses and lambdas are (T, tokens)."""
    p = exit_distribution(lambdas)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    return ((p * step_losses).sum(0) - beta * entropy).mean()


def gate_loss(step_losses: torch.Tensor, lambdas: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """Stage II: BCE between the continue probability 1 - lambda_{t-1} and sigmoid(k (I_t - gamma)),
    I_t = max(0, L_{t-1} - L_t) detached; mean over t = 2..T and tokens."""
    losses = step_losses.detach()
    improvement = (losses[:-1] - losses[1:]).clamp_min(0)
    target = torch.sigmoid(k * (improvement - gamma))
    return F.binary_cross_entropy((1 - lambdas[:-1]).clamp(1e-6, 1 - 1e-6), target)


def q_exit_steps(lambdas: torch.Tensor, q: float) -> torch.Tensor:
    """The pass index (0-based) each token stops at under Q-exit: the first whose cumulative exit
    probability reaches q, else the last. lambdas is (T, ...)."""
    cdf = exit_distribution(lambdas).cumsum(0)
    reached = cdf >= q
    reached[-1] = True
    return reached.float().argmax(0)


class LoopedDepth(nn.Module):
    """The depth schedule and exit objective of a looped model; `steps` passes over the same blocks."""

    def __init__(self, shape):
        super().__init__()
        loop = shape.loop
        self.steps, self.stage = loop.steps, loop.stage
        self.beta, self.k, self.gamma = loop.entropy_beta, loop.gate_k, loop.gate_gamma
        self.exit_threshold = loop.exit_threshold
        self.gate = ExitGate(shape.d_model)
        self.last_losses: list[torch.Tensor] = []
        self.last_exit_step: torch.Tensor | None = None

    def loss(self, states: list[torch.Tensor], targets: torch.Tensor, final_norm: nn.Module,
             lm_head: nn.Module) -> torch.Tensor:
        """The next-token objective of the stage over the passes' states (each (B, T, C), before the norm)."""
        step_losses, lambdas = [], []
        for z in states:
            h = final_norm(z)
            logits = lm_head(h).float()
            step_losses.append(F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="none"))
            lambdas.append(self.gate(h).reshape(-1))
        step_losses_t, lambdas_t = torch.stack(step_losses), torch.stack(lambdas)
        with torch.no_grad():
            p = exit_distribution(lambdas_t)
            self.last_losses = list(step_losses_t.detach().mean(1))
            self.last_exit_step = (p * torch.arange(1, len(states) + 1, device=p.device)[:, None]).sum(0).mean()
        if self.stage == "gate":
            return gate_loss(step_losses_t, lambdas_t, self.k, self.gamma)
        return joint_loss(step_losses_t, lambdas_t, self.beta)


def make_loop(shape) -> LoopedDepth | None:
    """The layer factory's depth schedule: None for one pass (the plain GPT), else the looped one."""
    return LoopedDepth(shape) if shape.loop is not None and shape.loop.steps > 1 else None

