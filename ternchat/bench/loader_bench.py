"""`ternchat bench loader`: how long training waits for data when some samples are slow to prepare.

The tiny model trains for the same steps on the same data with FIM at 50% and a calibrated slow step
(`samples.Delay`): a fixed 10% of the documents take `delay_steps` x the model's step time to prepare,
as a rustc check of a transformed snippet might. The step time is measured first, with the default
shard-window loader. Variants, each in this process with the same seed:
  windows   the default loader, no per-sample work (the reference);
  inline    documents prepared in the training process when a batch needs them;
  in order  `workers` worker processes handing samples out in order (PyTorch DataLoader's way);
  minato    MinatoLoader: `workers` fast workers with a per-sample timeout of half a step, and
            `slow_workers` background workers for the samples that exceed it.
Reported per variant: the share of step time spent waiting in `next_batch` (steps after the first
three, which start the workers), tokens/s and the samples that went slow. The first epoch's order is
the same for every variant, so they see the same slow documents.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ternchat.bench.runs import BENCH_OVERRIDES, variants_table_head
from ternchat.config import load_config
from ternchat.data.samples import Delay
from ternchat.train.report import machine

SKIP_STEPS = 3  # worker start-up and the first step's one-off costs


def _train(config: str | None, overrides: list[str], steps: int, delay: Delay | None) -> dict:
    from ternchat.train.trainer import Trainer

    cfg = load_config(config, [*overrides, *BENCH_OVERRIDES, f"train.max_steps={steps}"])
    with tempfile.TemporaryDirectory(prefix="ternchat-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", log=lambda _: None)
        if delay is not None:
            trainer.train_loader.add_stage(delay)
        start = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - start
        pool = getattr(trainer.train_loader, "pool", None)
        rows = [r for r in trainer.metrics.read() if isinstance(r.get("loss"), float)]
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    timed = rows[SKIP_STEPS:]
    step_seconds = [tokens_per_step / r["tok_s"] for r in timed]
    waited = [r["data_wait_s"] for r in timed]
    return {"steps": len(rows), "timed_steps": len(timed), "step_s_median": statistics.median(step_seconds),
            "step_s_mean": statistics.fmean(step_seconds), "wait_s": sum(waited),
            "wait_share": sum(waited) / sum(step_seconds), "max_wait_s": max(waited),
            "tok_s": tokens_per_step * len(timed) / sum(step_seconds), "wall_s": wall,
            "went_slow": getattr(pool, "slow_count", 0)}


def bench_loader(config: str | None, overrides: list[str], steps: int, slow_frac: float = 0.1,
                 delay_steps: float = 3.0, workers: int = 1, slow_workers: int = 1) -> dict:
    reference = _train(config, overrides, steps, None)
    step_s = reference["step_s_median"]
    delay = Delay(frac=slow_frac, seconds=delay_steps * step_s, seed=0)
    timeout_ms = max(1.0, 500 * step_s)  # half a step
    fim = ["loader.fim_rate=0.5"]
    variants = {
        "windows (no per-sample work)": None,
        "inline": fim,
        f"in order, {workers} worker(s)": [*fim, f"loader.workers={workers}"],
        f"minato, {workers} fast + {slow_workers} slow": [*fim, "loader.kind=minato", f"loader.workers={workers}",
                                                          f"loader.slow_workers={slow_workers}",
                                                          f"loader.timeout_ms={timeout_ms:.1f}"],
    }
    results = {"windows (no per-sample work)": reference}
    for name, extra in variants.items():
        if extra is not None:
            results[name] = _train(config, [*overrides, *extra], steps, delay)
    return {"machine": machine(), "steps": steps, "step_s": step_s, "delay_s": delay.seconds, "slow_frac": slow_frac,
            "timeout_ms": timeout_ms, "variants": results}


def format_loader(report: dict) -> str:
    lines = [f"Slow step: {100 * report['slow_frac']:g}% of documents take {report['delay_s']:.2f} s "
             f"({report['delay_s'] / report['step_s']:.1f} x the {report['step_s']:.3f} s median step); FIM on 50% "
             f"of documents; MinatoLoader timeout {report['timeout_ms']:.0f} ms.",
             *variants_table_head(report, ["loader", "data wait, % of step time", "longest wait (s)",
                                           "tok/s", "vs windows", "samples gone slow"])]
    base = report["variants"]["windows (no per-sample work)"]["tok_s"]
    for name, r in report["variants"].items():
        lines.append(f"| {name} | {100 * r['wait_share']:.2f}% | {r['max_wait_s']:.3f} | {r['tok_s']:,.0f} | "
                     f"{r['tok_s'] / base:.2f}x | {r['went_slow']} |")
    return "\n".join(lines)
