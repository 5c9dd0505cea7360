"""Run metrics as JSON lines: one object per logged event (train step, validation, sample)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """`enabled=False` (ranks other than 0 of a distributed run) writes nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: on resume the run repeats them."""
        if not self.enabled:
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
