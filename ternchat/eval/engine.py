"""Text generation with a KV cache: temperature, top-k, top-p (nucleus) sampling, stop tokens.

The prompt is run once to fill the cache; each new token then costs one single-position forward
pass. Sampling draws from a seeded `torch.Generator`, so a seeded call is reproducible.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ternchat.model.gpt import GPT, KVCache


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> int:
    """Draw one token id from the last-position logits (vocab,)."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 0.95, seed: int | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time until `max_new_tokens`, a stop id or the context end."""
    if not prompt:
        raise ValueError("the prompt must have at least one token")
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    seq_len = model.shape.seq_len
    prompt = list(prompt)[-(seq_len - 1):]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.shape, 1, min(seq_len, len(prompt) + max_new_tokens), device, torch.float32)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]
    for _ in range(max_new_tokens):
        token = sample_token(logits, temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        if cache.pos >= cache.max_len:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def complete(model: GPT, tokenizer, prompt: str, max_new_tokens: int, stop: Sequence[str] = (), *,
             temperature: float = 0.2, top_k: int = 50, top_p: float = 0.95, seed: int | None = None) -> str:
    """The text generated after `prompt`, ending before the first stop string or the end-of-document token."""
    ids: list[int] = []
    text = ""
    for token in generate(model, tokenizer.encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_ids=[tokenizer.eod_id]):
        ids.append(token)
        text = tokenizer.decode(ids)
        if any(s in text for s in stop):
            break
    return text
