"""`ternchat chat`: talk to a run in the terminal, with the reply streamed as it is generated.

A run made by `ternchat sft` or `rl` is prompted in the chat format (data/chat.py): the conversation so
far, then <|assistant_start|>, and the reply ends at <|assistant_end|>. Turns accumulate; when the
conversation outgrows the model's context, generation keeps its most recent tokens. A pretrained run has
no chat format, so each line is a prompt for the model to continue until the end-of-document token. A
model with MTP heads or modules decodes self-speculatively (the same greedy output, the same sampling
distribution). The reply's bytes go through an incremental UTF-8 decoder, so a character split across
tokens prints whole. `/reset` starts a new conversation, `/quit` or end of input leaves.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ternchat.data.chat import completion_prompt
from ternchat.data.fim import fim_prompt
from ternchat.data.tokenizer import Tokenizer
from ternchat.eval.decode_step import CompiledStep
from ternchat.eval.engine import SpeculationStats, generate
from ternchat.model.gpt import GPT


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    seed: int | None = None


def stream_text(tokens: Iterator[int], tok: Tokenizer) -> Iterator[str]:
    """Text pieces of generated tokens, never splitting a UTF-8 character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(tok.decode_bytes([token]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


class StopText:
    """Cut streamed text before the first of `stops`: pieces pass through `cut`, except a tail that may be the
    start of a stop string, held back until the next piece tells; `hit` says whether a stop string ended it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def cut(self, pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            self.pending += piece
            found = [self.pending.index(s) for s in self.stops if s in self.pending]
            if found:
                self.hit = True
                if min(found):
                    yield self.pending[:min(found)]
                return
            keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                        if self.pending.endswith(s[:n])), default=0)
            if len(self.pending) > keep:
                yield self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
        if self.pending:
            yield self.pending


class ChatSession:
    """One conversation with a model: `reply(text)` streams the answer to a user turn."""

    def __init__(self, model: GPT, tok: Tokenizer, chat_format: bool, sampling: Sampling, system: str | None = None,
                 compiled_step: CompiledStep | None = None):
        self.model, self.tok, self.chat_format, self.sampling = model, tok, chat_format, sampling
        self.compiled_step = compiled_step
        self.system = system
        self.speculative = getattr(model, "mtp", None) is not None
        self.turn = 0
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        s = self.sampling
        if self.chat_format:
            self.messages.append({"role": "user", "content": text})
            prompt = completion_prompt(self.messages, self.tok)
            stop = [self.tok.special("<|assistant_end|>"), self.tok.eod_id]
        else:
            prompt, stop = self.tok.encode(text), [self.tok.eod_id]
        seed = None if s.seed is None else s.seed + self.turn
        self.turn += 1
        tokens = generate(self.model, prompt, s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          seed=seed, stop_ids=stop, speculative=self.speculative, compiled_step=self.compiled_step)
        answer = ""
        for piece in stream_text(tokens, self.tok):
            answer += piece
            yield piece
        if self.chat_format:
            self.messages.append({"role": "assistant", "content": answer})


def run_terminal(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The read-reply loop: `read(prompt)` gives a line (EOFError ends), `write` prints a piece."""
    mode = "chat" if session.chat_format else "completion (a pretrained run: each line is continued)"
    write(f"ternchat chat, {mode}; /reset starts over, /quit leaves\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            write("(new conversation)\n")
            continue
        if not command:
            continue
        write("model> " if session.chat_format else "model> " + line)
        for piece in session.reply(line):
            write(piece)
        write("\n")


def stream_sample(model: GPT, tok: Tokenizer, prompt: str, sampling: Sampling, write: Callable[[str], None], *,
                  stop: Sequence[str] = (), fim_suffix: str | None = None, speculative: bool = False,
                  exit_threshold: float | None = None, compiled_step: CompiledStep | None = None) -> str:
    """`ternchat sample`: write the prompt and its continuation as it is generated (with `fim_suffix`, the
    middle between prompt and suffix, then the suffix); returns a line of what decoding did."""
    stats, passes = SpeculationStats(), []
    count, start = 0, time.perf_counter()
    prompt_ids = fim_prompt(prompt, fim_suffix, tok) if fim_suffix is not None else tok.encode(prompt)
    write(prompt)

    def counted(tokens: Iterator[int]) -> Iterator[int]:
        nonlocal count
        for token in tokens:
            count += 1
            yield token

    tokens = generate(model, prompt_ids, sampling.max_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p, seed=sampling.seed, stop_ids=[tok.eod_id], speculative=speculative,
                      stats=stats, exit_threshold=exit_threshold, passes_run=passes, compiled_step=compiled_step)
    for piece in StopText(stop).cut(stream_text(counted(tokens), tok)):
        write(piece)
    if fim_suffix is not None:
        write(fim_suffix)
    seconds = time.perf_counter() - start
    detail = ""
    if speculative:
        detail = f", {stats.steps} verify steps, draft acceptance by depth " \
                 f"{', '.join(f'{a:.0%}' for a in stats.acceptance())}"
    elif model.loop is not None and len(passes) > 1:  # the first entry is the prompt's, at full depth
        detail = f", {sum(passes[1:]) / len(passes[1:]):.2f} of {model.shape.loop_steps} passes per token"
    return f"[{count} tokens in {seconds:.2f}s, {count / max(seconds, 1e-9):.1f} tokens/s{detail}]"
