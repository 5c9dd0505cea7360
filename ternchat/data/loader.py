"""(B, T) batches from token shards, deterministic for a seed and resumable from a saved position.

The shards of a split are cut into windows of T+1 tokens at stride T (inputs are the first T,
targets the last T). Each epoch visits every window once, in an order fixed by (seed, epoch);
each step takes the next B windows per rank. The whole position is `(epoch, cursor)`, so
`state_dict()` saved in a checkpoint and `load_state_dict()` on resume continue the exact
sequence of batches (also at another number of ranks: the next step starts at the same window). A tail of fewer than B * world_size windows is skipped each epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ternchat.data.errors import DataError
from ternchat.data.shards import open_shard


class TokenLoader:
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
        if self.cursor + self.per_step > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        first = self.cursor + self.rank * self.batch_size
        picked = self._order[first:first + self.batch_size]
        self.cursor += self.per_step
        rows = np.stack([self._window(int(i)) for i in picked]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

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
