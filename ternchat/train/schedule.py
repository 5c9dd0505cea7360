"""Learning-rate and weight-decay schedules, as multipliers of the configured values.

`wsd`: linear warmup, constant, then linear warmdown to 0 over the last `warmdown_frac` of the run.
`bitnet_two_stage` (BitNet b1.58 2B4T's recipe): the same shape, but at mid-training the LR is
halved and weight decay switches off for the rest of the run.

Where the schedule turns is a `RunLength`. A run of a fixed step count knows it from the start. A
run with a time budget does not: it trains at constant LR (after warmup) while the clock runs, and
the trainer fixes each turn when the clock reaches it (`fix_warmdown`, `fix_stage2`); until then
nothing in the schedule depends on the unknown length, which is what WSD allows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunLength:
    total: int | None = None  # optimizer steps; None until a time budget fixes it
    warmdown_start: float | None = None  # first step of the linear decay
    stage2_start: int | None = None  # bitnet_two_stage's switch

    @classmethod
    def fixed(cls, total: int, warmdown_frac: float) -> "RunLength":
        return cls(total, total * (1.0 - warmdown_frac), total // 2)

    def fix_warmdown(self, start: int, steps: int) -> None:
        """Decay linearly over `steps` steps from `start`; the run ends there."""
        self.warmdown_start, self.total = start, start + steps
        if self.stage2_start is None:  # the midpoint had not been reached by the clock
            self.stage2_start = max(start, self.total // 2)

    def fix_stage2(self, start: int) -> None:
        self.stage2_start = start

    def to_dict(self) -> dict:
        return asdict(self)


def schedule(step: int, length: RunLength, warmup: int, kind: str = "wsd") -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        lr = (step + 1) / warmup
    elif length.warmdown_start is None or step < length.warmdown_start:
        lr = 1.0
    else:
        lr = max(0.0, (length.total - step) / max(length.total - length.warmdown_start, 1))
    if kind == "wsd":
        return lr, 1.0
    if kind == "bitnet_two_stage":
        second_stage = length.stage2_start is not None and step >= length.stage2_start
        return (lr * 0.5, 0.0) if second_stage else (lr, 1.0)
    raise ValueError(f"unknown schedule {kind!r}")


def switch_stage_on_the_clock(trainer, **_) -> None:
    """Trainer event `clock` of a time-budgeted `bitnet_two_stage` run: fix the stage switch at the step
    where the clock passes the middle of the training budget."""
    budget = trainer.training_budget_seconds()
    if trainer.length.stage2_start is None and trainer.wall_seconds >= budget / 2:
        trainer.length.fix_stage2(trainer.step)
        trainer.metrics.write(step=trainer.step, event="stage2_start", wall_seconds=trainer.wall_seconds)
