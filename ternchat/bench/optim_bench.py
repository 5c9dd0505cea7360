"""`ternchat bench optim`: the memory-efficient optimizers against full-precision Muon and AdamW.

Every variant trains the same model from the same seed on the same batches for the same number of
steps, each in its own process (so its peak resident memory is its own), and reports the bytes of
its real optimizer-state tensors per matrix parameter and per parameter, peak RSS, tokens/s and
the final validation loss; the loss curves go to a PNG. A second part times the GaLore 2 projector
refresh: randomized SVD against `torch.linalg.svd` on a 1024 x 4096 matrix at rank 256, with the
projection error of each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ternchat.bench.runs import measure_in_subprocess
from ternchat.optim.galore import randomized_svd_basis
from ternchat.train.report import machine

GALORE = ["optim.use_galore=true", "optim.galore_rank=64", "optim.galore_update_freq=50", "optim.galore_min_dim=256"]
VARIANTS: dict[str, list[str]] = {
    "AdamW": ["optim.matrix_optimizer=adamw", "optim.lr_matrix=0.003"],
    "Muon": [],
    "8-bit Muon": ["optim.use_8bit_optim=true"],
    "GaLore+AdamW": ["optim.matrix_optimizer=adamw", "optim.lr_matrix=0.003", *GALORE],
    "GaLore+Muon (GUM)": GALORE,
    "GaLore+8-bit Muon": [*GALORE, "optim.use_8bit_optim=true"],
    "FOAM": ["optim.matrix_optimizer=foam", "optim.lr_matrix=0.012"],  # x foam_scale 0.25 = AdamW's 0.003
}


def time_projector_refresh(rows: int = 1024, cols: int = 4096, rank: int = 256, repeats: int = 3) -> dict:
    """Randomized SVD vs exact SVD for the projector of a gradient-like (decaying spectrum) matrix."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, rows, generator=gen))[0]
    spectrum = torch.arange(1, rows + 1, dtype=torch.float32) ** -1.0
    g = (u * spectrum) @ v.T

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    exact_s, exact = best(lambda: torch.linalg.svd(g, full_matrices=False)[0][:, :rank])
    rand_s, approx = best(lambda: randomized_svd_basis(g, rank, 8, 2, torch.Generator().manual_seed(1)))
    error = lambda basis: ((g - basis @ (basis.T @ g)).norm() / g.norm()).item()
    return {"shape": [rows, cols], "rank": rank, "exact_svd_s": exact_s, "randomized_svd_s": rand_s,
            "speedup": exact_s / rand_s, "exact_projection_error": error(exact),
            "randomized_projection_error": error(approx)}


def bench_optim(config: str | None, overrides: list[str], steps: int, out_dir: Path, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, variant in VARIANTS.items():
        log(f"training {name} for {steps} steps in its own process ...")
        results.append({"name": name, **measure_in_subprocess(config, [*overrides, "train.compile=false", *variant],
                                                              steps)})
        log(f"  val loss {results[-1]['val_loss']:.4f}, {results[-1]['tok_s']:,.0f} tok/s")
    refresh = time_projector_refresh()
    report = {"machine": machine(), "steps": steps, "variants": results, "projector_refresh": refresh}
    (out_dir / "bench_optim.json").write_text(json.dumps(report, indent=1))
    plot_curves(results, out_dir / "optim_loss.png")
    return report


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        steps, losses = zip(*r["losses"])
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.2, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(report: dict) -> str:
    muon = next(r for r in report["variants"] if r["name"] == "Muon")
    lines = [f"Machine: {report['machine']}; {report['steps']} steps per optimizer, same seed and batches.", "",
             "| optimizer | state B / matrix param | state B / param | peak RSS | tok/s | final val loss | vs Muon |",
             "|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        lines.append(f"| {r['name']} | {r['matrix_state_bytes_per_param']:.3f} | {r['state_bytes_per_param']:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['tok_s']:,.0f} | {r['val_loss']:.4f} | "
                     f"{100 * (r['val_loss'] / muon['val_loss'] - 1):+.2f}% |")
    p = report["projector_refresh"]
    lines += ["", f"Projector refresh, {p['shape'][0]}x{p['shape'][1]} at rank {p['rank']}: exact SVD "
                  f"{p['exact_svd_s']:.3f} s, randomized SVD {p['randomized_svd_s']:.3f} s ({p['speedup']:.1f}x); "
                  f"projection error {p['exact_projection_error']:.4f} exact vs {p['randomized_projection_error']:.4f} "
                  f"randomized ({100 * (p['randomized_projection_error'] / p['exact_projection_error'] - 1):+.1f}%)."]
    return "\n".join(lines)
