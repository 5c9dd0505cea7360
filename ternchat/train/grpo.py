"""The GRPO policy-gradient loss (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) in the on-policy form
nanochat's `scripts/chat_rl.py` uses, with the paper's options.

For a group of G completions of one prompt with rewards r_1..r_G, each completion's advantage is
A_i = r_i - mean(r) (nanochat), or (r_i - mean(r)) / (std(r) + eps) with `normalize_std` (the paper).
On-policy (nanochat: no old policy, no ratio, no clipping) the loss is
    L = - sum_{i,t} mask_{i,t} * A_i * log pi(y_{i,t} | y_{i,<t}) / sum_{i,t} mask_{i,t},
over completion tokens only: prompt and forced tokens have mask 0. With `old_logprobs` (several updates
per batch of samples) the per-token term is the paper's clipped surrogate
    min(rho A, clip(rho, 1 - eps_clip, 1 + eps_clip) A),  rho = pi / pi_old,
and with `ref_logprobs` and `kl_coef` > 0 the paper's k3 estimate of KL(pi || pi_ref),
    exp(ref - logp) - (ref - logp) - 1, is added per token with that weight. A group whose rewards are
all equal has zero advantages and so adds nothing. `ternchat rl` (train/rl.py) samples the groups,
scores them in the rustc sandbox and calls this loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Advantages of (..., G) rewards, G completions per group along the last dimension."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if normalize_std:
        centered = centered / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)
    return centered


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at every position: (B, T, V) logits and (B, T) targets -> (B, T)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
              old_logprobs: torch.Tensor | None = None, clip: float = 0.2, ref_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimize for (B, T) completion tokens (`mask` 1 on generated tokens) with (B,)
    advantages; returns it and what to log."""
    logp = token_logprobs(logits, targets)
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    if old_logprobs is None:
        objective = logp * adv
    else:
        ratio = torch.exp(logp - old_logprobs)
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None and kl_coef > 0:
        delta = ref_logprobs - logp
        kl = torch.exp(delta) - delta - 1
    per_token = -objective + kl_coef * kl
    tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / tokens
    stats = {"tokens": float(mask.sum()), "kl": float((kl.detach() * mask).sum() / tokens),
             "mean_logprob": float((logp.detach() * mask).sum() / tokens)}
    return loss, stats
