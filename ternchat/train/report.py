"""The run report: `report.md` and `loss.png` in the run folder, from what the run measured."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ternchat.config import Config
from ternchat.train.metrics import MetricsLog


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "RTX 4090": 165.2, "RTX PRO 6000 Blackwell": 503.8, "A100": 312.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


def model_flops_utilization(parameters: int, tok_s: float, device: str) -> float | None:
    """6 x parameters x tokens/s over one CUDA device's dense bf16 peak (None off CUDA or for an unknown GPU)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    peak = bf16_peak_tflops(torch.cuda.get_device_name())
    return 6 * parameters * tok_s / (peak * 1e12) if peak else None


def plot_loss(metrics: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r and isinstance(r["loss"], float)]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def write_report(run_dir: Path, cfg: Config, result: dict, samples: list[dict]) -> Path:
    metrics = MetricsLog(run_dir / "metrics.jsonl").read()
    plot_loss(metrics, run_dir / "loss.png")
    losses = [r["loss"] for r in metrics if isinstance(r.get("loss"), float)]
    params = result["parameters"]
    mfu = model_flops_utilization(params["total"], result["tok_s"], result["device"])
    lines = [
        f"# Run report: {run_dir.name}", "",
        f"Machine: {machine()}. Device used: {result['device']}.", "",
        "| measure | value |", "|---|---|",
        f"| steps | {result['steps']} |",
        f"| tokens seen | {result['tokens_seen']:,} |",
        f"| training time | {result['train_seconds'] / 60:.1f} min |",
        f"| throughput | {result['tok_s']:,.0f} tokens/s"
        + (f" (MFU {100 * mfu:.1f}%: 6 x parameters x tokens/s over the GPU's dense bf16 peak; the time "
           "includes compilation and evaluation)" if mfu is not None else "") + " |",
        f"| peak memory | {result['peak_memory_bytes'] / 2**20:,.0f} MiB |",
        f"| first / last train loss | {losses[0]:.3f} / {losses[-1]:.3f} |" if losses else "| train loss | - |",
        f"| final val loss | {result.get('val_loss', float('nan')):.4f} |",
        f"| final val bits per byte | {result.get('val_bpb', float('nan')):.4f} |",
        (f"| shipped Rust problems ({result['rust_problems']}, greedy, rustc sandbox) | pass@1 "
         f"{result['rust_pass@1']:.3f}, compile rate {result['rust_compile_rate']:.3f} |"
         if "rust_pass@1" in result else "| shipped Rust problems | not evaluated (eval.rust_problems off or no rustc) |"),
        "",
        "Parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()), "",
        "![loss curve](loss.png)", "", "## Samples", "",
    ]
    for s in samples:
        lines += ["```rust", s["prompt"] + s["completion"], "```", ""]
    lines += ["## Config", "", "```toml", cfg.to_toml().rstrip(), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report_at_end(trainer, result: dict, **_) -> dict:
    """Trainer event `run_end` (with `eval.report`): report.md and loss.png on rank 0."""
    if not trainer.ranks.main:
        return {}
    return {"report": str(write_report(trainer.run_dir, trainer.cfg, result, result.get("samples", [])))}
