"""Text generation with a KV cache: temperature, top-k, top-p (nucleus) sampling, stop tokens, and
self-speculative decoding for models with multi-token prediction.

The prompt is run once to fill the cache; each new token then costs one single-position forward
pass. Sampling draws from a seeded `torch.Generator`, so a seeded call is reproducible.

Batched decoding (`generate_batch`, `complete_batch`): prompts of different lengths are left-padded to
one length and the cache hides the padding from every query (`KVCache.padding`); rotary attention
depends on relative positions only, so a row sees what it would alone, up to floating-point rounding
(greedy outputs may differ only at near ties). Each row has its own seeded generator and its own stops.
An evaluation decodes with `for_batches(model)`: the dense kernel, whose GEMM gains from the batch's rows.

Self-speculative decoding (`speculative=True`, a model trained with `[mtp]`): the token after the
last one fed is chosen from the main head as usual; the MTP heads or modules draft the `n_future`
tokens after it; one forward of the main model over the chosen token and the drafts verifies them,
and the KV cache is rolled back past the first rejected one. Greedy: a draft is accepted while it
equals the main model's argmax, then the main model's own token follows, so the output is exactly
plain greedy decoding's. Sampling (Leviathan et al. 2023 / Chen et al. 2023): draft x drawn from the
draft distribution q is accepted with probability min(1, p(x)/q(x)), else the token is drawn from
norm(max(0, p - q)) and drafting restarts there; p and q get the same temperature, top-k and top-p,
so the output is distributed as plain sampling's. Each step emits at least one token.

A looped model (`[loop]`) decodes each new token with Q-exit at `exit_threshold` q (model/looped.py;
the run's `loop.exit_threshold` by default): its passes stop at the first whose cumulative exit
probability reaches q, and the passes it skipped get its last pass's keys and values in the cache so
later tokens can attend to it; q = 1 runs every pass. Speculative decoding verifies at full depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch

from ternchat.eval.decode_step import CompiledStep
from ternchat.model.bitlinear import set_kernel, to_inference
from ternchat.model.gpt import GPT, KVCache


def token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution sampling draws from (vocab,): temperature, then top-k, then top-p."""
    logits = logits.float() / temperature
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
    return probs


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> int:
    """Draw one token id from the last-position logits (vocab,)."""
    if temperature <= 0:
        return int(logits.float().argmax())
    return _draw(token_probs(logits, temperature, top_k, top_p), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class SpeculationStats:
    """What self-speculative decoding did: verify steps, drafts offered and accepted per depth."""

    steps: int = 0
    tokens: int = 0
    offered: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def acceptance(self) -> list[float]:
        return [a / o if o else 0.0 for a, o in zip(self.accepted, self.offered)]


def _cache_dtype(model: GPT) -> torch.dtype:
    """The KV cache holds keys and values in the model's float dtype (a model cast to bf16 decodes in bf16)."""
    return model.embed.weight.dtype


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 0.95, seed: int | None = None, stop_ids: Sequence[int] = (), speculative: bool = False,
             stats: SpeculationStats | None = None, exit_threshold: float | None = None,
             passes_run: list[int] | None = None, compiled_step: CompiledStep | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until `max_new_tokens`, a stop id or the context end; with
    `speculative`, drafted by the model's MTP heads or modules and verified (module docstring). A looped
    model exits at `exit_threshold` (default: the model's); `passes_run` collects the passes of each step.
    With `compiled_step` (eval/decode_step.py, made once per model) each token after the prompt runs as one
    compiled static-shape graph."""
    if not prompt:
        raise ValueError("the prompt must have at least one token")
    if speculative:
        if getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding needs a model trained with multi-token prediction ([mtp])")
        yield from _speculative(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                                stats if stats is not None else SpeculationStats())
        return
    model.eval()
    device = _device(model)
    seq_len = model.shape.seq_len
    prompt = list(prompt)[-(seq_len - 1):]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache_len = seq_len if compiled_step is not None else min(seq_len, len(prompt) + max_new_tokens)
    cache = KVCache(model.shape, 1, cache_len, device, _cache_dtype(model))
    q = (model.loop.exit_threshold if model.loop is not None else 1.0) if exit_threshold is None else exit_threshold

    def step(ids: list[int]) -> torch.Tensor:
        if compiled_step is not None and cache.pos > 0:
            return compiled_step(ids[0], cache)
        states, ran = model.passes(torch.tensor([ids], device=device), cache, q)
        if passes_run is not None:
            passes_run.append(ran)
        return model.exit_logits(states, q)[0, -1]

    logits = step(prompt)
    for _ in range(max_new_tokens):
        token = sample_token(logits, temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        if cache.pos >= cache.max_len:
            return
        logits = step([token])


def decodes_in_batches(model: GPT) -> bool:
    """Whether `generate_batch` decodes as `generate` would: not for a looped model whose Q-exit picks
    each token's depth (per row and token, so one row at a time)."""
    return model.loop is None or model.loop.exit_threshold >= 1


def for_batches(model: GPT) -> GPT:
    """`model` (in place) with its ternary layers in inference form and the dense kernel, the fastest for
    a batch on a CPU; its outputs equal the float kernel's and BitLinear's bit for bit. Not for a model
    that goes on training."""
    to_inference(model)
    return set_kernel(model, "dense")


@torch.no_grad()
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.8,
                   top_k: int = 50, top_p: float = 0.95, seeds: Sequence[int | None] | None = None,
                   stop_ids: Sequence[int] = (), finished: Callable[[int, list[int]], bool] | None = None
                   ) -> list[list[int]]:
    """The new tokens of each prompt, generated together: the prompts are left-padded to one length (the
    cache hides the padding from every query), then each step runs one position for every row; a row ends
    at its own stop id, at `max_new_tokens` or at the context end, and the batch when all rows have. Each
    row samples with its own seeded generator, as `generate` would with that seed; `finished(row, tokens)`
    may end a row early (a stop string). A looped model decodes at full depth here (Q-exit decides per
    token, one row at a time: use `generate`)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt must have at least one token")
    model.eval()
    device = _device(model)
    seq_len = model.shape.seq_len
    prompts = [list(p)[-(seq_len - 1):] for p in prompts]
    width = max(len(p) for p in prompts)
    steps = min(max_new_tokens, seq_len - width)
    pad = [width - len(p) for p in prompts]
    generators = [torch.Generator().manual_seed(s) if s is not None else None
                  for s in (seeds if seeds is not None else [None] * len(prompts))]
    cache = KVCache(model.shape, len(prompts), width + max(steps, 0), device, _cache_dtype(model))
    cache.padding = torch.zeros(len(prompts), cache.max_len, dtype=torch.bool, device=device)
    rows = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, (p, n) in enumerate(zip(prompts, pad)):
        cache.padding[i, :n] = True
        rows[i, n:] = torch.tensor(p, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits = model.exit_logits(model.passes(rows, cache)[0], 1.0)[:, -1]
    for _ in range(max_new_tokens):
        chosen = []
        for i, row_logits in enumerate(logits):
            token = sample_token(row_logits, temperature, top_k, top_p, generators[i]) if not done[i] else 0
            if not done[i] and token in stop_ids:
                done[i] = True
            elif not done[i]:
                out[i].append(token)
                done[i] = finished is not None and finished(i, out[i])
            chosen.append(token)
        if all(done) or cache.pos >= cache.max_len:
            break
        next_ids = torch.tensor(chosen, device=device)[:, None]
        logits = model.exit_logits(model.passes(next_ids, cache)[0], 1.0)[:, -1]
    return out


class _Drafter:
    """The MTP blocks' view of the sequence: each block keeps a KV cache (depth 1) and the states it
    made, so a draft costs one position per block. A head's input is the trunk's state only, so it
    stays in step with the main cache; a module's input at position i also needs the token at i + k,
    so its cache holds only positions whose inputs are settled and the rest is recomputed."""

    def __init__(self, model: GPT, max_len: int, device: torch.device):
        self.model, self.mtp, self.kind = model, model.mtp, model.shape.mtp.kind
        depth = self.mtp.n_future
        one = replace(model.shape, depth=1, loop=None)
        self.caches = [KVCache(one, 1, max_len, device, _cache_dtype(model)) for _ in range(depth)]
        # states[0]: the trunk's; states[k]: head k's or module k's output, by position
        self.states = torch.zeros(depth + 1, max_len, model.shape.d_model, device=device)

    def observe(self, trunk: torch.Tensor, start: int) -> None:
        """The trunk's states of positions start.. (1, T, d) from a main forward."""
        T = trunk.shape[1]
        self.states[0, start:start + T] = trunk[0]
        if self.kind == "heads":  # heads depend on the trunk only: run them on the new positions now
            cos, sin = self.model.rope(start, T)
            for j, cache in enumerate(self.caches, start=1):
                cache.pos = start
                self.states[j, start:start + T] = self.mtp.hidden(j, trunk, cos, sin, cache)[0]
                cache.pos = start + T

    def rollback(self, length: int) -> None:
        for cache in self.caches:
            cache.pos = min(cache.pos, length)

    def draft(self, tokens: list[int], last: int, pick) -> list[tuple[int, torch.Tensor | None]]:
        """Drafts after `tokens[last + 1]` (chosen, not yet fed): (token, its draft distribution or None when
        greedy) per depth. `tokens` holds every token to `last + 1`; drafts are appended to a copy."""
        lm_head, drafts, seq = self.model.lm_head, [], list(tokens[:last + 2])
        for k, cache in enumerate(self.caches, start=1):
            if self.kind == "modules":  # catch module k up to `last`, from the states of module k - 1
                start = cache.pos
                embedded = self.model.embed(torch.tensor([seq[start + k:last + 1 + k]], device=self.states.device))
                cos, sin = self.model.rope(start, last + 1 - start)
                h = self.mtp.hidden(k, self.states[k - 1, start:last + 1][None], embedded, cos, sin, cache)
                cache.pos = last + 1
                self.states[k, start:last + 1] = h[0]
                cache.pos = min(cache.pos, last + 2 - k)  # positions whose token i + k is settled
            token, probs = pick(self.mtp.logits(k, self.states[k, last], lm_head))
            drafts.append((token, probs))
            seq.append(token)
        return drafts


def _speculative(model: GPT, prompt: Sequence[int], max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int | None, stop_ids: Sequence[int], stats: SpeculationStats) -> Iterator[int]:
    model.eval()
    device = _device(model)
    seq_len = model.shape.seq_len
    tokens = list(prompt)[-(seq_len - 1):]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    greedy = temperature <= 0
    max_len = min(seq_len, len(tokens) + max_new_tokens)
    cache = KVCache(model.shape, 1, max_len, device, _cache_dtype(model))
    drafter = _Drafter(model, max_len, device)
    depth = model.mtp.n_future
    stats.offered, stats.accepted = stats.offered or [0] * depth, stats.accepted or [0] * depth

    def pick(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if greedy:
            return int(logits.float().argmax()), None
        probs = token_probs(logits, temperature, top_k, top_p)
        return _draw(probs, generator), probs

    trunk = model.hidden(torch.tensor([tokens], device=device), cache)
    drafter.observe(trunk, 0)
    chosen, _ = pick(model.logits(trunk[0, -1]))
    emitted = 0
    while True:
        if chosen in stop_ids:
            return
        yield chosen
        emitted += 1
        stats.tokens += 1
        if emitted >= max_new_tokens or cache.pos >= max_len:
            return
        tokens.append(chosen)
        last = cache.pos - 1  # the last position fed; `chosen` goes at cache.pos
        room = min(depth, max_len - cache.pos - 1, max_new_tokens - emitted)
        drafts = drafter.draft(tokens, last, pick)[:room]
        start = cache.pos
        trunk = model.hidden(torch.tensor([[chosen] + [t for t, _ in drafts]], device=device), cache)
        logits = model.logits(trunk[0])  # logits[i]: the main model after chosen and i drafts
        stats.steps += 1
        accepted, correction = 0, None
        for i, (draft, q) in enumerate(drafts):
            stats.offered[i] += 1
            if greedy:
                main = int(logits[i].float().argmax())
                if main != draft:
                    correction = main
                    break
            else:
                p = token_probs(logits[i], temperature, top_k, top_p)
                ratio = float(p[draft] / q[draft]) if q[draft] > 0 else 1.0
                if torch.rand((), generator=generator) >= min(1.0, ratio):
                    residual = (p - q).clamp(min=0)
                    correction = _draw(residual / residual.sum() if residual.sum() > 0 else p, generator)
                    break
            stats.accepted[i] += 1
            accepted += 1
        kept = start + 1 + accepted  # chosen and the accepted drafts
        cache.pos = kept
        drafter.observe(trunk[:, :1 + accepted], start)
        drafter.rollback(kept)
        for draft, _ in drafts[:accepted]:
            if draft in stop_ids:
                return
            yield draft
            emitted += 1
            stats.tokens += 1
            tokens.append(draft)
            if emitted >= max_new_tokens:
                return
        if correction is None:  # every draft accepted: the main model's token after them
            correction, _ = pick(logits[accepted])
        chosen = correction


def _text_until(tokens: Iterator[int], tokenizer, stop: Sequence[str]) -> str:
    """Decode generated tokens until a stop string appears (kept) or the tokens end."""
    ids: list[int] = []
    text = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if any(s in text for s in stop):
            break
    return text


def complete(model: GPT, tokenizer, prompt: str, max_new_tokens: int, stop: Sequence[str] = (), *,
             temperature: float = 0.2, top_k: int = 50, top_p: float = 0.95, seed: int | None = None,
             speculative: bool | None = None) -> str:
    """The text generated after `prompt`, ending before the first stop string or the end-of-document token;
    speculative (same greedy output, same sampling distribution) by default when the model has MTP."""
    if speculative is None:
        speculative = getattr(model, "mtp", None) is not None
    return _text_until(generate(model, tokenizer.encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_ids=[tokenizer.eod_id], speculative=speculative),
                       tokenizer, stop)


def complete_batch(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stops: Sequence[Sequence[str]], stop_ids: Sequence[int], *, temperature: float = 0.2,
                   top_k: int = 50, top_p: float = 0.95, seeds: Sequence[int | None] | None = None,
                   batch_size: int = 8) -> list[str]:
    """The texts generated after each encoded prompt, `batch_size` rows at a time (`generate_batch`), each
    ending before its first stop string (kept, as `complete` keeps it) or a stop id."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))

        def finished(row: int, tokens: list[int]) -> bool:
            text = tokenizer.decode(tokens)
            return any(s in text for s in stops[chunk[row]])

        ids = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seeds=[seeds[i] for i in chunk] if seeds is not None else None,
                             stop_ids=stop_ids, finished=finished)
        texts += [tokenizer.decode(row) for row in ids]
    return texts


def chat_reply(model: GPT, tokenizer, messages: Sequence[dict], max_new_tokens: int, stop: Sequence[str] = (), *,
               temperature: float = 0.2, top_k: int = 50, top_p: float = 0.95, seed: int | None = None) -> str:
    """The assistant's reply to a conversation that ends with a user turn (the chat format of
    data/chat.py), ending before <|assistant_end|>, the end-of-document token or a stop string."""
    from ternchat.data.chat import completion_prompt

    stop_ids = [tokenizer.special("<|assistant_end|>"), tokenizer.eod_id]
    return _text_until(generate(model, completion_prompt(messages, tokenizer), max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids), tokenizer, stop)
