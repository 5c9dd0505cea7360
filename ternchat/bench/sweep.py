"""`ternchat bench sweep`: a grid of config values, each trained the same way, compared on held-out data.

Every point of the grid (the product of the `--grid KEY=V1,V2,...` lists) trains the config's model
from the same seed on the same batches for the same number of steps, each in its own process, and
reports the final validation loss and bits per byte (`eval.val_batches` held-out batches). The best
point is the one with the lowest validation loss.
"""

from __future__ import annotations

import itertools

from ternchat.bench.runs import measure_in_subprocess
from ternchat.config import ConfigError, load_config
from ternchat.train.report import machine


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`KEY=V1,V2` strings -> {KEY: [V1, V2]}; each key and value is checked against the config."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        if not values:
            raise ConfigError(f"--grid expects section.key=value1,value2,..., got {spec!r}")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
        for value in grid[key.strip()]:
            load_config(overrides=[f"{key.strip()}={value}"])
    return grid


def bench_sweep(config: str | None, overrides: list[str], grid: dict[str, list[str]], steps: int,
                log=print) -> dict:
    points = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        log(f"training {', '.join(f'{k}={v}' for k, v in setting.items())} for {steps} steps ...")
        result = measure_in_subprocess(config, [*overrides, *(f"{k}={v}" for k, v in setting.items())], steps)
        points.append({"setting": setting, **{k: result[k] for k in ("val_loss", "val_bpb", "tok_s")}})
        log(f"  val loss {result['val_loss']:.4f}, val bpb {result['val_bpb']:.4f}")
    return {"machine": machine(), "config": config or "tiny_cpu (built-in)", "overrides": overrides, "steps": steps,
            "points": points, "best": min(points, key=lambda p: p["val_loss"])["setting"]}


def format_sweep(report: dict) -> str:
    keys = list(report["points"][0]["setting"])
    best = min(p["val_loss"] for p in report["points"])
    lines = [f"Machine: {report['machine']}; {report['config']} {' '.join(report['overrides'])}; "
             f"{report['steps']} steps per point, same seed and batches.", "",
             "| " + " | ".join(keys) + " | val loss | val bits/byte | vs best |",
             "|" + "---|" * (len(keys) + 3)]
    for p in report["points"]:
        lines.append("| " + " | ".join(p["setting"][k] for k in keys) + f" | {p['val_loss']:.4f} | "
                     f"{p['val_bpb']:.4f} | {100 * (p['val_loss'] / best - 1):+.2f}% |")
    lines += ["", "best: " + ", ".join(f"{k} = {v}" for k, v in report["best"].items())]
    return "\n".join(lines)
