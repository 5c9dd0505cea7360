"""Where samples are prepared: in the training process, in worker processes handed out in order, or
MinatoLoader's way (Nouaji et al., EuroSys 2026, arXiv 2509.10712).

MinatoLoader: each sample is prepared by a fast worker under a per-sample timeout (the artifact's
0.5 s). A sample that is not ready by then leaves the fast path: the fast worker hands it, with the
stage it reached, to a slow queue served by background workers, and takes the next sample. Batches
are built from the samples that are ready, in the order they were submitted, skipping the ones gone
slow; a slow sample joins the next batch built after it is done. So one slow sample delays no batch
by more than the timeout, every sample is still delivered exactly once, and when nothing times out
the order is the submission order (deterministic for a seed). Unlike the artifact (where a `with
ThreadPoolExecutor` block waits for the timed-out sample after all), the fast worker really moves
on: the slow stage gives up at the deadline and the slow worker starts it again. Not built: the
paper's scaling of the worker counts at run time; the counts are set in `[loader]`.

`SamplePool(in_order=True)` is the usual data loader (PyTorch's `DataLoader` with workers): the same
processes, samples handed out strictly in submission order, so one slow sample holds up the batch
(head-of-line blocking); `InlinePool` prepares each sample in the training process when it is asked
for. Workers are spawned processes, so preparing data never holds the training step's GIL. A worker
that dies is an error naming it, not a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Sequence

from ternchat.data.errors import DataError
from ternchat.data.samples import ContextSpec, Sample, Stage, run_stages

POLL_SECONDS = 0.5  # how often a waiting loader checks that its workers are alive


def _worker(role: str, spec: ContextSpec, stages: Sequence[Stage], timeout_s: float | None,
            tasks: mp.Queue, slow_tasks: mp.Queue, results: Connection) -> None:
    ctx = spec.open()
    source = tasks if role == "fast" else slow_tasks
    while True:
        sample = source.get()
        if sample is None:
            return
        try:
            deadline = time.monotonic() + timeout_s if role == "fast" and timeout_s is not None else None
            if run_stages(sample, stages, ctx, deadline):
                results.send(("done", sample))
            else:
                sample.went_slow = True
                results.send(("slow", sample.key))
                slow_tasks.put(sample)
        except Exception:  # noqa: BLE001 - reported to the training process, which raises it
            results.send(("error", sample.key, traceback.format_exc()))


class InlinePool:
    """Prepare each sample in the calling process, when it is asked for."""

    def __init__(self, spec: ContextSpec, stages: Sequence[Stage]):
        self.ctx, self.stages = spec.open(), list(stages)
        self.order: deque[Sample] = deque()

    def submit(self, sample: Sample) -> None:
        self.order.append(sample)

    @property
    def in_flight(self) -> int:
        return len(self.order)

    def pending(self) -> list[tuple[int, int, int]]:
        return [(s.epoch, s.slot, s.doc) for s in self.order]

    def next_ready(self) -> Sample:
        sample = self.order.popleft()
        run_stages(sample, self.stages, self.ctx, None)
        return sample

    def close(self) -> None:
        self.order.clear()


class SamplePool:
    """Worker processes preparing samples; `in_order` hands them out in submission order, otherwise
    MinatoLoader's fast path with `timeout_s` and `slow_workers` background workers."""

    def __init__(self, spec: ContextSpec, stages: Sequence[Stage], *, workers: int, slow_workers: int = 0,
                 timeout_s: float | None = None, in_order: bool = True):
        if workers < 1:
            raise ValueError("a SamplePool needs at least one worker")
        if not in_order and (slow_workers < 1 or timeout_s is None):
            raise ValueError("MinatoLoader needs a timeout and at least one slow worker")
        self.in_order = in_order
        context = mp.get_context("spawn")  # workers import numpy and tiktoken only, never a forked torch
        self.tasks, self.slow_tasks = context.Queue(), context.Queue()
        limit = None if in_order else timeout_s
        # One result pipe per worker: a worker killed in the middle of a message closes its own pipe
        # (the reader gets EOF) instead of leaving a shared queue's reader waiting for the rest.
        self.procs, self.readers = [], {}
        for role, count in (("fast", workers), ("slow", 0 if in_order else slow_workers)):
            for i in range(count):
                reader, writer = context.Pipe(duplex=False)
                proc = context.Process(target=_worker, name=f"ternchat-loader-{role}-{i}", daemon=True,
                                       args=(role, spec, list(stages), limit, self.tasks, self.slow_tasks, writer))
                proc.start()
                writer.close()
                self.procs.append(proc)
                self.readers[reader] = proc
        self.order: deque[tuple[int, int]] = deque()  # submitted and not handed out, in submission order
        self.docs: dict[tuple[int, int], int] = {}
        self.done: dict[tuple[int, int], Sample] = {}
        self.slow: set[tuple[int, int]] = set()  # handed to the slow queue, not back yet
        self.was_slow: set[tuple[int, int]] = set()
        self.slow_count = 0  # samples that went slow so far

    def submit(self, sample: Sample) -> None:
        self.order.append(sample.key)
        self.docs[sample.key] = sample.doc
        self.tasks.put(sample)

    @property
    def in_flight(self) -> int:
        return len(self.order)

    def pending(self) -> list[tuple[int, int, int]]:
        return [(*key, self.docs[key]) for key in self.order]

    def _pick(self) -> tuple[int, int] | None:
        if self.in_order:
            head = self.order[0]
            return head if head in self.done else None
        for key in self.order:  # a finished slow sample first: it has waited longest
            if key in self.was_slow and key in self.done:
                return key
        for key in self.order:  # then the oldest sample still on the fast path
            if key not in self.slow and key not in self.was_slow:
                return key if key in self.done else None
        return None

    def next_ready(self) -> Sample:
        if not self.order:
            raise RuntimeError("next_ready() with nothing submitted")
        while (key := self._pick()) is None:
            self._receive()
        self.order.remove(key)
        self.docs.pop(key)
        self.was_slow.discard(key)
        return self.done.pop(key)

    def _dead_worker(self, proc: mp.Process) -> DataError:
        proc.join(timeout=1)
        self.close()
        return DataError(f"data loader worker {proc.name} died (exit code {proc.exitcode}); the samples it held "
                         "cannot be prepared")

    def _receive(self) -> None:
        for reader in wait(list(self.readers), timeout=POLL_SECONDS):
            try:
                self._handle(reader.recv())
            except (EOFError, OSError):
                raise self._dead_worker(self.readers[reader]) from None
        dead = [p for p in self.procs if p.exitcode is not None]
        if dead:
            raise self._dead_worker(dead[0])

    def _handle(self, message: tuple) -> None:
        kind, payload = message[0], message[1]
        if kind == "done":
            self.done[payload.key] = payload
            self.slow.discard(payload.key)
        elif kind == "slow":
            self.slow.add(payload)
            self.was_slow.add(payload)
            self.slow_count += 1
        else:
            self.close()
            raise DataError(f"preparing sample {payload} failed in a loader worker:\n{message[2]}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
        for q in (self.tasks, self.slow_tasks):
            q.cancel_join_thread()
            q.close()
        for reader in self.readers:
            reader.close()
        self.procs, self.readers = [], {}
