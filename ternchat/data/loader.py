"""(B, T) batches for training, deterministic for a seed and resumable from a saved position.

`TokenLoader` (the default) cuts fixed windows from the token shards; `DocumentLoader` packs
documents prepared one by one (FIM, compile-tag weights, slow transforms, MinatoLoader), and
`make_train_loader` picks the one `[loader]` asks for.

TokenLoader: the shards of a split are cut into windows of T+1 tokens at stride T (inputs are the first T,
targets the last T). Each epoch visits every window once, in an order fixed by (seed, epoch);
each step takes the next B windows per rank. The whole position is `(epoch, cursor)`, so
`state_dict()` saved in a checkpoint and `load_state_dict()` on resume continue the exact
sequence of batches (also at another number of ranks: the next step starts at the same window). A tail of fewer than B * world_size windows is skipped each epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ternchat.config import LoaderConfig
from ternchat.data.errors import DataError
from ternchat.data.minato import InlinePool, SamplePool
from ternchat.data.samples import (ContextSpec, DocumentIndex, FillInTheMiddle, ReadDocument, Sample, Stage,
                                   document_weights, epoch_documents, tag_token_shares)
from ternchat.data.shards import open_shard


class _BatchIterator:
    position_per_rank = False  # True: each rank's state_dict differs and a checkpoint keeps them all

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


class TokenLoader(_BatchIterator):
    """Iterator of `(inputs, targets)` int64 tensors of shape (batch_size, seq_len)."""

    def __init__(self, shard_paths: Sequence[Path], batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, tokenizer_hash: str | None = None, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", verify: bool = True):
        if not shard_paths:
            raise DataError("the loader got no shard files; run `ternchat data shards` first")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = [open_shard(p, tokenizer_hash, verify_body=verify) for p in shard_paths]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        windows = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.window_start = np.concatenate([[0], np.cumsum(windows)])
        self.n_windows = int(self.window_start[-1])
        self.per_step = batch_size * world_size
        if self.n_windows < self.per_step:
            raise DataError(f"the shards hold {self.n_windows} windows of {seq_len + 1} tokens, fewer than one "
                            f"step needs ({batch_size} x {world_size} ranks); use a smaller batch or seq_len")
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)
        self.wait_seconds = 0.0  # time spent in next_batch: data the step waited for

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.window_start, index, side="right")) - 1
        start = (index - int(self.window_start[shard])) * self.seq_len
        return self.shards[shard].tokens[start:start + self.seq_len + 1]

    @property
    def steps_per_epoch(self) -> int:
        return self.n_windows // self.per_step

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.cursor + self.per_step > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        first = self.cursor + self.rank * self.batch_size
        picked = self._order[first:first + self.batch_size]
        self.cursor += self.per_step
        rows = np.stack([self._window(int(i)) for i in picked]).astype(np.int64)
        self.wait_seconds += time.perf_counter() - start
        return _inputs_and_targets(rows, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "n_windows": self.n_windows, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        # The position counts windows, so it carries over to another batch size or number of ranks.
        for key in ("seed", "shuffle", "n_windows", "seq_len"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the loader: saved {key}={state.get(key)!r} but this run has "
                                f"{key}={mine[key]!r} (different data or batch shape)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)

    def close(self) -> None:
        pass


def _inputs_and_targets(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) rows of token ids -> inputs (the first T) and targets (the last T) on `device`."""
    batch = torch.from_numpy(rows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


class DocumentLoader(_BatchIterator):
    """Iterator of `(inputs, targets)` packed from documents prepared one by one.

    Each rank takes every world_size-th document of the epoch's order (`samples.epoch_documents`),
    prepares it through its stages (read, FIM, extra ones) in the pool `[loader]` names, and appends
    the result to a token stream; each batch is B rows of T+1 tokens at stride T from the front of
    that stream, and the rest waits for the next batch. The position is (next document, documents
    in preparation, tokens waiting), so a checkpoint resumes exactly: the documents in preparation
    (in any queue) are prepared again, deterministically, and each document is still delivered once
    per epoch. Positions are per rank: resuming needs the same number of ranks.
    """

    position_per_rank = True

    def __init__(self, shard_paths: Sequence[Path], tokenizer_dir: Path, batch_size: int, seq_len: int,
                 loader: LoaderConfig, *, seed: int = 0, weights: np.ndarray | None = None,
                 tokenizer_hash: str | None = None, bos_id: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", extra_stages: Sequence[Stage] = (),
                 on_sample: Callable[[Sample], None] | None = None, index: DocumentIndex | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.index = index or DocumentIndex(shard_paths, bos_id, tokenizer_hash)
        if weights is not None and len(weights) != self.index.n_docs:
            raise DataError(f"{len(weights)} document weights for {self.index.n_docs} documents")
        self.spec = ContextSpec(list(shard_paths), Path(tokenizer_dir), self.index.starts)
        self.stages: list[Stage] = [ReadDocument()]
        if loader.fim_rate > 0:
            self.stages.append(FillInTheMiddle(loader.fim_rate, loader.fim_spm_rate, seed))
        self.stages += list(extra_stages)
        self.cfg, self.weights, self.on_sample = loader, weights, on_sample
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.epoch, self.slot = 0, 0  # the next document to submit
        self._docs = self._epoch_docs(0)
        self._resubmit: list[tuple[int, int, int]] = []
        self.buffer = np.zeros(0, dtype=np.int64)
        self.pool: InlinePool | SamplePool | None = None
        self.wait_seconds = 0.0
        self.samples_seen = 0

    def add_stage(self, stage: Stage) -> None:
        """Append a preparation stage (a benchmark's slow step, say); only before the first batch."""
        if self.pool is not None:
            raise RuntimeError("add_stage() must come before the first batch")
        self.stages.append(stage)

    def _epoch_docs(self, epoch: int) -> np.ndarray:
        docs = epoch_documents(self.index.n_docs, self.weights, self.seed, epoch)[self.rank::self.world_size]
        if len(docs) == 0:
            raise DataError(f"rank {self.rank} has no documents in epoch {epoch}: the weighted split holds fewer "
                            f"documents than the {self.world_size} ranks")
        return docs

    def _start_pool(self) -> InlinePool | SamplePool:
        c = self.cfg
        if c.kind == "minato":
            return SamplePool(self.spec, self.stages, workers=c.workers, slow_workers=c.slow_workers,
                              timeout_s=c.timeout_ms / 1000, in_order=False)
        if c.workers > 0:
            return SamplePool(self.spec, self.stages, workers=c.workers, in_order=True)
        return InlinePool(self.spec, self.stages)

    def _fill(self) -> None:
        limit = max(1, self.cfg.prefetch)
        while self.pool.in_flight < limit:
            if self._resubmit:
                epoch, slot, doc = self._resubmit.pop(0)
            else:
                if self.slot == len(self._docs):
                    self.epoch, self.slot = self.epoch + 1, 0
                    self._docs = self._epoch_docs(self.epoch)
                epoch, slot, doc = self.epoch, self.slot, int(self._docs[self.slot])
                self.slot += 1
            self.pool.submit(Sample(epoch, slot, doc))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.pool is None:
            self.pool = self._start_pool()
        need = self.batch_size * self.seq_len + 1
        pieces, have = [self.buffer], len(self.buffer)
        while have < need:
            self._fill()
            sample = self.pool.next_ready()
            pieces.append(sample.tokens)
            have += len(sample.tokens)
            self.samples_seen += 1
            if self.on_sample is not None:
                self.on_sample(sample)
        self._fill()  # keep the workers busy while the step runs
        stream = np.concatenate(pieces)
        rows = np.lib.stride_tricks.sliding_window_view(stream[:need], self.seq_len + 1)[::self.seq_len]
        self.buffer = stream[need - 1:]
        self.wait_seconds += time.perf_counter() - start
        return _inputs_and_targets(np.ascontiguousarray(rows), self.device)

    def _signature(self) -> dict:
        c = self.cfg
        return {"kind": "documents", "seed": self.seed, "n_docs": self.index.n_docs, "seq_len": self.seq_len,
                "world_size": self.world_size, "fim": [c.fim_rate, c.fim_spm_rate], "weights": c.weights(),
                "stages": [s.name for s in self.stages]}

    def state_dict(self) -> dict:
        pending = self.pool.pending() if self.pool is not None else []
        return {**self._signature(), "epoch": self.epoch, "slot": self.slot, "rank": self.rank,
                "pending": [list(p) for p in [*self._resubmit, *pending]], "buffer": self.buffer.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None:
            raise RuntimeError("load_state_dict() must come before the first batch")
        signature = self._signature()
        if "weights" in state:  # a checkpoint from before a compile tag existed weighted that tag 1
            state = {**state, "weights": {**dict.fromkeys(signature["weights"], 1.0), **state["weights"]}}
        for key, mine in signature.items():
            if state.get(key) != mine:
                raise DataError(f"cannot resume the loader: saved {key}={state.get(key)!r} but this run has "
                                f"{key}={mine!r} (different data, loader settings or number of ranks)")
        self.epoch, self.slot = int(state["epoch"]), int(state["slot"])
        self._docs = self._epoch_docs(self.epoch)
        self._resubmit = [tuple(int(v) for v in p) for p in state["pending"]]
        self.buffer = np.asarray(state["buffer"], dtype=np.int64)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def make_train_loader(loader: LoaderConfig, shard_paths: Sequence[Path], *, tokenizer, tokenizer_dir: Path,
                      corpus_dir: Path, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                      device: str | torch.device = "cpu", log: Callable[[str], None] = print
                      ) -> TokenLoader | DocumentLoader:
    """The training loader `[loader]` asks for: shard windows unless documents must be prepared."""
    if not loader.per_document:
        return TokenLoader(shard_paths, batch_size, seq_len, seed=seed, tokenizer_hash=tokenizer.hash,
                           device=device, rank=rank, world_size=world_size)
    index = DocumentIndex(shard_paths, tokenizer.bos_id, tokenizer.hash)
    weights = document_weights(corpus_dir, "train", index.n_docs, loader.weights())
    shares = tag_token_shares(corpus_dir, "train", index.lengths(), weights)
    if shares:
        log("training tokens by compile tag: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in shares.items()))
    fim = f", FIM on {100 * loader.fim_rate:g}% of documents" if loader.fim_rate else ""
    workers = (f"{loader.workers} fast + {loader.slow_workers} slow workers, {loader.timeout_ms:g} ms timeout"
               if loader.kind == "minato" else f"{loader.workers} workers" if loader.workers else "in process")
    log(f"loader: {index.n_docs:,} documents packed into rows, {loader.kind} ({workers}){fim}")
    return DocumentLoader(shard_paths, tokenizer_dir, batch_size, seq_len, loader, seed=seed, weights=weights,
                          tokenizer_hash=tokenizer.hash, bos_id=tokenizer.bos_id, rank=rank,
                          world_size=world_size, device=device, index=index)
