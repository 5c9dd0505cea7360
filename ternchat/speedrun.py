"""`ternchat speedrun`: the main job in one command.

Pretraining for the config's time budget: the data is built when missing (or read from a
prepared-data folder, `data.prepared`), then val bits per byte, samples, the shipped Rust problems
when rustc is here, and report.md with the loss curve (the trainer's events, `eval.report`). With
`[speedrun] sft`, SFT follows on the training tasks and the corpus's mined functions
(`sft.time_limit_min` or `sft.steps`) into the run folder NAME_sft; with `[speedrun] export`, the last
stage's packed model file, which samples and evaluates (`ternchat eval --run FILE`) on any machine,
so a GPU machine without rustc can train and another machine can score. report.md gains a section
per stage after pretraining.
"""

from __future__ import annotations

from pathlib import Path

from ternchat.config import Config
from ternchat.runs import load_model_and_tokenizer, run_stage
from ternchat.train.checkpoint import latest_checkpoint
from ternchat.train.sft import sft, sft_corpus
from ternchat.train.stage import stage_tasks
from ternchat.train.trainer import train


def speedrun(cfg: Config, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Pretrain `run_dir`, then the stages `cfg.speedrun` asks for (module docstring); the pretraining
    result with `report`, and `sft` and `model_file` when those ran."""
    result = train(cfg, run_dir, resume, log)
    sections: list[str] = []
    last = run_dir
    if cfg.speedrun.sft:
        out = run_dir.with_name(run_dir.name + "_sft")
        tasks = stage_tasks(cfg, None, cfg.eval.allow_unisolated, log)
        result["sft"] = sft(run_dir, out, tasks, sft_corpus(cfg), resume=resume and latest_checkpoint(out) is not None,
                            log=log)
        sections += sft_section(result["sft"])
        last = out
    if cfg.speedrun.export:
        from ternchat.export.formats import export_model

        model, tok = load_model_and_tokenizer(last)
        path = export_model(model, tok, last, "packed", stage=run_stage(last), log=log)
        result["model_file"] = str(path)
        sections += ["## Model file", "",
                     f"`{path}`: {path.stat().st_size / 2 ** 20:.1f} MiB, stage {run_stage(last)}, tokenizer included. "
                     "Score it where rustc is:", "", "```bash",
                     f"ternchat eval humaneval-rust --run {path} --problems rust_basics", "```", ""]
    if sections and result.get("report"):
        report = Path(result["report"])
        report.write_text(report.read_text() + "\n".join(["", *sections]))
    return result


def sft_section(r: dict) -> list[str]:
    vals = r["val_losses"]
    return ["## SFT", "",
            "| measure | value |", "|---|---|",
            f"| run folder | `{r['run']}` |",
            f"| steps | {r['steps']} in {r['seconds'] / 60:.1f} min |",
            f"| conversations | {r['train_conversations']:,} training, {r['val_conversations']:,} held out |",
            f"| held-out reply loss | {vals[0]:.4f} -> {vals[-1]:.4f} |" if vals else "| held-out reply loss | - |",
            f"| last training loss | {r['final_train_loss']:.4f} |" if r["final_train_loss"] is not None else "",
            ""]
