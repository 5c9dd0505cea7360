"""Learning-rate and weight-decay schedules, as multipliers of the configured values.

`wsd`: linear warmup, constant, then linear warmdown to 0 over the last `warmdown_frac` of the run.
`bitnet_two_stage` (BitNet b1.58 2B4T's recipe): the same shape, but at mid-training the LR is
halved and weight decay switches off for the rest of the run.
"""

from __future__ import annotations


def schedule(step: int, total: int, warmup: int, warmdown_frac: float, kind: str = "wsd") -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) for optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        lr = (step + 1) / warmup
    else:
        warmdown_start = total * (1.0 - warmdown_frac)
        lr = 1.0 if step < warmdown_start else max(0.0, (total - step) / max(total - warmdown_start, 1))
    if kind == "wsd":
        return lr, 1.0
    if kind == "bitnet_two_stage":
        second_stage = step >= total // 2
        return (lr * 0.5, 0.0) if second_stage else (lr, 1.0)
    raise ValueError(f"unknown schedule {kind!r}")
