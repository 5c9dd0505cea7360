"""`ternchat bench dist`: tokens/s of one process against two torchrun ranks on the same global batch.

Each run trains the config's model for the same steps from the same seed on the same global batch
(one process takes `2 x batch_size` rows per step; each of the two ranks takes `batch_size`),
compiled or not as the config says, in fresh processes. On a 2-core CPU the two ranks share the
cores the single process uses with two threads, so this measures the overhead of the
distributed step (gradient all-reduce or FSDP2's gathers, the owner's gather and scatter of each
matrix), not a speed-up; on a machine with a device per rank the same command shows the scaling.
"""

from __future__ import annotations

from ternchat.bench.runs import measure_in_subprocess
from ternchat.config import load_config
from ternchat.train.report import machine


def bench_dist(config: str | None, overrides: list[str], steps: int) -> dict:
    batch = load_config(config, overrides).train.batch_size
    runs = {}
    for name, ranks, extra in [("1 process", 1, [f"train.batch_size={2 * batch}"]),
                               ("2 ranks, DDP", 2, ["dist.strategy=ddp"]),
                               ("2 ranks, FSDP2", 2, ["dist.strategy=fsdp2"])]:
        print(f"training {name} for {steps} steps ...", flush=True)
        runs[name] = measure_in_subprocess(config, [*overrides, *extra], steps, ranks=ranks)
        print(f"  {runs[name]['tok_s']:,.0f} tok/s, val loss {runs[name]['val_loss']:.4f}", flush=True)
    return {"machine": machine(), "steps": steps, "global_batch": 2 * batch, "runs": runs}


def format_dist(result: dict) -> str:
    base = result["runs"]["1 process"]["tok_s"]
    lines = [f"Machine: {result['machine']}; {result['steps']} steps of {result['global_batch']} sequences each.",
             "", "| run | tok/s | vs 1 process | final val loss | peak RSS (rank 0) |", "|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {r['val_loss']:.4f} | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines)
