"""The GRPO loss: a hand-computed value, zero gradient for equal rewards, masked tokens, and a toy
bandit that learns its rewarded token."""

import math

import pytest
import torch

from ternchat.train.grpo import group_advantages, grpo_loss, token_logprobs

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


def test_advantages_center_and_optionally_scale():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # exact: rewards 0/1 and their means are dyadic, so every difference is representable
    assert torch.equal(group_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    scaled = group_advantages(r, normalize_std=True)
    assert torch.allclose(scaled[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(scaled[1], torch.zeros(4))


def test_loss_equals_a_hand_computed_value():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]],
                           [[0.0, 0.0], [0.0, math.log(4.0)]]])  # (B=2, T=2, V=2)
    targets = torch.tensor([[1, 0], [0, 1]])
    mask = torch.tensor([[1, 1], [0, 1]])
    adv = torch.tensor([1.0, -2.0])
    # log p: seq 0 -> log(3/4), log(2/3); seq 1 -> (masked) log(1/2), log(4/5)
    expected = -(1.0 * math.log(3 / 4) + 1.0 * math.log(2 / 3) - 2.0 * math.log(4 / 5)) / 3
    loss, stats = grpo_loss(logits, targets, mask, adv)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6) and stats["tokens"] == 3
    # the clipped surrogate at the sampling policy (ratio 1) has the same value and gradient
    old = token_logprobs(logits, targets).detach()
    clipped, _ = grpo_loss(logits, targets, mask, adv, old_logprobs=old)
    assert math.isclose(clipped.item(), -(1 + 1 - 2) / 3, rel_tol=1e-6)


def test_equal_rewards_give_zero_gradient_and_masked_tokens_nothing():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4, 5))
    mask = torch.ones(4, 5)
    loss, _ = grpo_loss(logits, targets, mask, group_advantages(torch.full((4,), 0.7)))
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    logits.grad = None
    mask[:, :2] = 0  # prompt tokens
    loss, _ = grpo_loss(logits, targets, mask, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, :2]) == 0 and torch.count_nonzero(logits.grad[:, 2:]) > 0


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    mask, adv = torch.ones(2, 3), torch.zeros(2)
    ref = token_logprobs(logits, targets)
    _, same = grpo_loss(logits, targets, mask, adv, ref_logprobs=ref, kl_coef=0.1)
    _, away = grpo_loss(logits, targets, mask, adv, ref_logprobs=ref - 0.5, kl_coef=0.1)
    assert abs(same["kl"]) < 1e-7 and away["kl"] > 0


def test_a_toy_bandit_learns_the_rewarded_token():
    """One-step completions from a policy over 8 tokens; reward 1 for token 3. Groups of 8, on-policy."""
    torch.manual_seed(0)
    policy = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([policy], lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        probs = torch.softmax(policy.detach(), -1)
        samples = torch.multinomial(probs, 8, replacement=True, generator=gen)
        rewards = (samples == 3).float()
        logits = policy.expand(8, 1, 8)
        loss, _ = grpo_loss(logits, samples.view(8, 1), torch.ones(8, 1), group_advantages(rewards))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(policy.detach(), -1)[3] > 0.5
