"""Documents as samples: where each document lies in the token shards, which documents an epoch
visits, and the stages that prepare one document for training.

A split's shards hold `<|bos|> tokens <|eod|>` documents back to back in corpus order (a document may
run across two shard files), so document i is the i-th `<|bos|>` of the split and line i of the
corpus's `<split>.jsonl`. An epoch visits each document `weight` times in expectation (whole copies
plus one more with the fractional part's probability), in an order fixed by (seed, epoch); weights
come from the compile tags of `ternchat data verify`, and a weight of 0 filters a tag out.

Preparing a sample runs its stages in order: read the document's tokens, then each transform (FIM,
or anything slow). A stage that can run long takes a deadline and raises `StageTimeout` when it
passes; the sample then records the stage it stopped at, so another worker can finish it. This
module does not import torch: the loader's worker processes import it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ternchat.data.errors import DataError
from ternchat.data.fim import FimTokens, fim_draw, fim_tokens
from ternchat.data.shards import open_shard
from ternchat.data.tokenizer import Tokenizer

COMPILE_TAGS = ("compiles", "parses", "syntax_error", "fails", "unchecked")


class DocumentIndex:
    """The documents of one split's shards, readable by number."""

    def __init__(self, shard_paths: Sequence[Path], bos_id: int, tokenizer_hash: str | None = None,
                 verify: bool = True, starts: np.ndarray | None = None):
        if not shard_paths:
            raise DataError("no shard files for the document index; run `ternchat data shards` first")
        self.shards = [open_shard(p, tokenizer_hash, verify_body=verify) for p in shard_paths]
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)
        if starts is None:
            starts = np.concatenate([np.flatnonzero(s.tokens == bos_id) + off
                                     for s, off in zip(self.shards, self.offsets[:-1])]).astype(np.int64)
        if len(starts) == 0:
            raise DataError(f"the shards ({shard_paths[0]} ...) hold no documents")
        self.starts = starts
        self.ends = np.concatenate([starts[1:], [self.offsets[-1]]])

    @property
    def n_docs(self) -> int:
        return len(self.starts)

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def tokens(self, doc: int) -> np.ndarray:
        """Document `doc` with its <|bos|> and <|eod|>, as int64."""
        start, end = int(self.starts[doc]), int(self.ends[doc])
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < end:
            local = start - int(self.offsets[first])
            take = min(end, int(self.offsets[first + 1])) - start
            pieces.append(self.shards[first].tokens[local:local + take])
            start += take
            first += 1
        return np.concatenate(pieces).astype(np.int64)


def document_tags(corpus_dir: Path, split: str, n_docs: int) -> np.ndarray | None:
    """Index into COMPILE_TAGS of each document's tag from `compile_tags.jsonl`, or None without that
    file. Documents past the tagged ones (`data verify --limit`) count as `unchecked`."""
    path = Path(corpus_dir) / "compile_tags.jsonl"
    if not path.exists():
        return None
    tags = np.full(n_docs, COMPILE_TAGS.index("unchecked"), dtype=np.int64)
    seen = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == split:
                if seen >= n_docs:
                    raise DataError(f"{path} tags more {split} documents than the shards hold ({n_docs}): it "
                                    "belongs to another corpus; re-run `ternchat data verify`")
                tags[seen] = COMPILE_TAGS.index(row["tag"])
                seen += 1
    return tags


def document_weights(corpus_dir: Path, split: str, n_docs: int, weight_of: dict[str, float]) -> np.ndarray | None:
    """Expected copies per epoch of each document from its compile tag, or None when every weight is 1."""
    if all(weight_of[tag] == 1.0 for tag in COMPILE_TAGS):
        return None
    tags = document_tags(corpus_dir, split, n_docs)
    if tags is None:
        raise DataError(f"loader weights by compile tag need {Path(corpus_dir) / 'compile_tags.jsonl'}; run "
                        "`ternchat data verify` first (or set every loader.weight_* to 1)")
    weights = np.asarray([weight_of[tag] for tag in COMPILE_TAGS], dtype=np.float64)[tags]
    if not weights.any():
        raise DataError("every document has weight 0: the loader.weight_* settings filter out all the data")
    return weights


def tag_token_shares(corpus_dir: Path, split: str, lengths: np.ndarray, weights: np.ndarray | None) -> dict:
    """Share of the training tokens (documents x weight) of each compile tag, for the run's log."""
    tags = document_tags(corpus_dir, split, len(lengths))
    if tags is None:
        return {}
    mass = np.bincount(tags, weights=lengths * (weights if weights is not None else 1.0), minlength=len(COMPILE_TAGS))
    total = float(mass.sum()) or 1.0
    return {tag: float(mass[i]) / total for i, tag in enumerate(COMPILE_TAGS)}


def epoch_documents(n_docs: int, weights: np.ndarray | None, seed: int, epoch: int, shuffle: bool = True
                    ) -> np.ndarray:
    """The documents epoch `epoch` visits, in order: each `weight` times in expectation."""
    rng = np.random.default_rng([seed, epoch])
    docs = np.arange(n_docs, dtype=np.int64)
    if weights is not None:
        whole = np.floor(weights).astype(np.int64)
        copies = whole + (rng.random(n_docs) < weights - whole)
        docs = np.repeat(docs, copies)
    return rng.permutation(docs) if shuffle else docs


@dataclass
class Sample:
    """One document on its way to a batch; `slot` is its place in its epoch's order."""

    epoch: int
    slot: int
    doc: int
    stage: int = 0  # the next stage to run
    tokens: np.ndarray | None = None
    seconds: float = 0.0  # time spent preparing it so far
    went_slow: bool = False  # finished by a slow worker after the fast path's timeout

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.slot


class StageTimeout(Exception):
    """A stage gave up at its deadline; the sample is to be finished without one."""


@dataclass
class SampleContext:
    """What a stage may use: the documents and the tokenizer (opened once per worker)."""

    index: DocumentIndex
    tokenizer: Tokenizer


@dataclass
class ContextSpec:
    """A picklable recipe for a SampleContext, sent to worker processes."""

    shard_paths: list[Path]
    tokenizer_dir: Path
    starts: np.ndarray = field(repr=False)

    def open(self) -> SampleContext:
        tok = Tokenizer.load(self.tokenizer_dir)
        return SampleContext(DocumentIndex(self.shard_paths, tok.bos_id, verify=False, starts=self.starts), tok)


class Stage(Protocol):
    name: str

    def __call__(self, sample: Sample, ctx: SampleContext, deadline: float | None) -> None: ...


class ReadDocument:
    name = "read"

    def __call__(self, sample: Sample, ctx: SampleContext, deadline: float | None) -> None:
        sample.tokens = ctx.index.tokens(sample.doc)


@dataclass
class FillInTheMiddle:
    """The FIM transform of `ternchat.data.fim` on one document's text."""

    rate: float
    spm_rate: float
    seed: int
    name: str = "fim"

    def __call__(self, sample: Sample, ctx: SampleContext, deadline: float | None) -> None:
        inner = sample.tokens[1:-1]  # without <|bos|> and <|eod|>
        text = ctx.tokenizer.decode(inner.tolist())
        cuts = fim_draw(self.seed, sample.epoch, sample.doc, len(text), self.rate, self.spm_rate)
        if cuts is not None:
            sample.tokens = fim_tokens(text, cuts, ctx.tokenizer, FimTokens.of(ctx.tokenizer))


@dataclass
class Delay:
    """A calibrated slow step for benchmarks: `frac` of the documents (fixed by seed) take `seconds`.
    It honours the deadline as a real slow step (a rustc check, a remote fetch) would: it gives up
    there, and the worker that finishes the sample starts it again."""

    frac: float
    seconds: float
    seed: int = 0
    name: str = "delay"

    def is_slow(self, doc: int) -> bool:
        return bool(np.random.default_rng([self.seed, doc, 0x534C4F57]).random() < self.frac)

    def __call__(self, sample: Sample, ctx: SampleContext, deadline: float | None) -> None:
        if not self.is_slow(sample.doc):
            return
        end = time.monotonic() + self.seconds
        if deadline is not None and deadline < end:
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise StageTimeout
        time.sleep(max(0.0, end - time.monotonic()))


def run_stages(sample: Sample, stages: Sequence[Stage], ctx: SampleContext, deadline: float | None) -> bool:
    """Run the sample's remaining stages; False when the deadline passed first (`sample.stage` says
    where to go on), True when it is ready."""
    start = time.monotonic()
    try:
        while sample.stage < len(stages):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            stages[sample.stage](sample, ctx, deadline)
            sample.stage += 1
        return True
    except StageTimeout:
        return False
    finally:
        sample.seconds += time.monotonic() - start
