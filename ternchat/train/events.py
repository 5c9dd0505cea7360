"""Trainer events: the loop says what happened; what to do about it lives with whoever cares.

The pretraining loop emits
- `step_end` after an optimizer step whose loss was finite (samples are written here when due),
- `eval` after a validation measurement, with its numbers,
- `clock` after the step's wall time is counted, while a time-budgeted run's length is not yet fixed
  (BitNet's two-stage schedule switches stage here),
- `checkpoint` after a checkpoint is written,
- `run_end` once training stops, with the run's result, which handlers may add to (the compiled Rust
  evaluation, the report).
A post-training stage emits `stage_switch` when it starts from its parent's weights (FIRE acts here).
A handler is called with the emitter and the event's keyword arguments and may return a dict, which is
merged into what `emit` returns. Which handlers run is decided once, from the config, by
`pretraining_events` and `stage_events`, so the loop itself names no technique.
"""

from __future__ import annotations

from typing import Any, Callable

from ternchat.config import Config

EVENTS = ("step_end", "eval", "clock", "checkpoint", "run_end", "stage_switch")
Handler = Callable[..., dict | None]


class Events:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENTS}

    def on(self, event: str, handler: Handler) -> "Events":
        if event not in self._handlers:
            raise ValueError(f"unknown trainer event {event!r}; events are {', '.join(EVENTS)}")
        self._handlers[event].append(handler)
        return self

    def emit(self, event: str, source: Any, **info: Any) -> dict:
        """Call `event`'s handlers in the order they were registered; their returned dicts, merged."""
        merged: dict = {}
        for handler in self._handlers[event]:
            merged.update(handler(source, **info) or {})
        return merged

    def fold(self, event: str, source: Any, result: dict) -> dict:
        """Like `emit`, but each handler gets `result` with what the earlier ones returned merged in (the
        report reads the compiled evaluation's numbers); returns `result`."""
        for handler in self._handlers[event]:
            result.update(handler(source, result=result) or {})
        return result


def pretraining_events(cfg: Config) -> Events:
    """The handlers a pretraining run of `cfg` registers."""
    from ternchat.train.report import write_report_at_end
    from ternchat.train.run_evals import rust_problems_at_end, samples_when_due
    from ternchat.train.schedule import switch_stage_on_the_clock

    events = Events().on("step_end", samples_when_due)  # every eval.sample_every steps, and at the last one
    if cfg.train.schedule == "bitnet_two_stage" and cfg.train.time_limit_min > 0:
        events.on("clock", switch_stage_on_the_clock)
    if cfg.eval.rust_problems:
        events.on("run_end", rust_problems_at_end)
    if cfg.eval.report:
        events.on("run_end", write_report_at_end)
    return events


def stage_events(cfg: Config, stage: str) -> Events:
    """The handlers a post-training stage `stage` ("sft", "rl") of `cfg` registers."""
    from ternchat.train.fire import fire_at_switch

    events = Events()
    if getattr(cfg.fire, f"at_{stage}", False):
        events.on("stage_switch", fire_at_switch)
    return events
