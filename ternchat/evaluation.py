"""`ternchat eval humaneval-rust`: completions from a model, a file or the problems' own solutions,
compiled and run in the rustc sandbox, summarized as pass@k, compile rate and rustc error codes.
`ternchat eval bpb`: a model's bits per byte on the held-out crates, as the trainer measures them, so that
the stages after pretraining (SFT, RL) are measured on the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ternchat.verify.humaneval import build_program, load_problem_set, references, score, stop_at_stop_tokens
from ternchat.verify.inputs import read_completions
from ternchat.verify.metrics import summarize, write_reports
from ternchat.verify.sandbox import Limits, checked_isolation


def model_completions(run: Path, problems: Sequence, samples: int, temperature: float | None, max_tokens: int,
                      seed: int, chat: bool | None, experiences: Path | None, top_p: float = 0.95,
                      batch_size: int = 8, log=print) -> tuple[dict[str, list[str]], dict]:
    """`samples` completions per problem from the model at `run` (a run folder or packed file), sample i
    seeded `seed + i`: greedy for one sample unless a temperature is given, else T = 0.2; in the chat
    format for post-trained models; `batch_size` at a time. Also the settings they were made with."""
    import torch

    from ternchat.data.chat import completion_prompt
    from ternchat.eval.engine import chat_reply, complete, complete_batch, decodes_in_batches, for_batches
    from ternchat.runs import load_model_and_tokenizer, run_stage
    from ternchat.train.tfgrpo import Library, messages_with

    model, tok = load_model_and_tokenizer(run)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU machine generates where rustc may be absent
    model.to(device)
    temperature = 0.0 if samples == 1 and temperature is None else (temperature or 0.2)
    chat = chat if chat is not None else (run_stage(run) != "pretrain" or bool(experiences))
    library = Library.load(experiences) if experiences else Library()
    log(f"prompting {'in the chat format (the task as the user turn)' if chat else 'by plain completion'}"
        + (f", with {len(library.experiences)} experiences as the system message" if experiences else ""))
    jobs = [(p, seed + i) for p in problems for i in range(samples)]
    if batch_size > 1 and decodes_in_batches(model):
        for_batches(model)
        prompts = [completion_prompt(messages_with(library, p), tok) if chat else tok.encode(p.prompt) for p, _ in jobs]
        stop_ids = [tok.special("<|assistant_end|>"), tok.eod_id] if chat else [tok.eod_id]
        texts = []
        for start in tqdm(range(0, len(jobs), batch_size), desc=f"generate (batches of {batch_size})", unit="batch"):
            chunk = jobs[start:start + batch_size]
            texts += complete_batch(model, tok, prompts[start:start + batch_size], max_tokens,
                                    [p.stop_tokens for p, _ in chunk], stop_ids, temperature=temperature, top_p=top_p,
                                    seeds=[s for _, s in chunk], batch_size=batch_size)
    else:
        def sample(p, seed: int) -> str:
            if chat:
                return chat_reply(model, tok, messages_with(library, p), max_tokens, p.stop_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)
            return complete(model, tok, p.prompt, max_tokens, p.stop_tokens, temperature=temperature, top_p=top_p,
                            seed=seed)

        texts = [sample(p, s) for p, s in tqdm(jobs, desc="generate", unit="completion")]
    completions: dict[str, list[str]] = {p.name: [] for p in problems}
    for (p, _), text in zip(jobs, texts):
        completions[p.name].append(text)
    settings = {"model": str(run), "samples per problem": samples,
                "temperature": temperature if temperature > 0 else "0 (greedy)",
                "top-p": top_p if temperature > 0 else "-", "max tokens": max_tokens, "seed": seed,
                "prompt": "chat format" if chat else "plain completion", "stop": "the problem's stop tokens",
                "batch": batch_size, "device": device}
    return completions, settings


SETTINGS_FILE = "completions_settings.json"  # beside a generated completions file: how it was sampled


def write_completions(run: Path, problems: Sequence, out: Path | None, made: tuple[dict[str, list[str]], dict],
                      log=print) -> dict:
    """`eval --generate-only`: completions.jsonl (rows {"name", "completions"}) and their sampling settings."""
    completions, settings = made
    out = out or Path(run if run.is_dir() else run.parent) / "completions"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "completions.jsonl"
    path.write_text("".join(json.dumps({"name": p.name, "completions": completions[p.name]}) + "\n"
                            for p in problems))
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    log(f"{sum(map(len, completions.values()))} completions of {len(problems)} problems -> {path}; score them where "
        f"rustc is with `ternchat eval humaneval-rust --completions {path} --problems ...`")
    return {"out": str(out), "completions": str(path)}


def evaluate(problems_source: str, *, run: Path | None = None, completions_file: Path | None = None,
             strict: bool = False, samples: int = 1, ks: Sequence[int] = (1,), temperature: float | None = None,
             max_tokens: int = 256, seed: int = 0, workers: int = 0, out: Path | None = None,
             experiences: Path | None = None, chat: bool | None = None, allow_unisolated: bool = False,
             top_p: float = 0.95, batch_size: int = 8, generate_only: bool = False, log=print) -> dict:
    """Score `run`'s completions, a completions file's, or (neither) the canonical solutions; write the
    reports to `out` and return the summary (with `out`). With `generate_only`, write `run`'s completions
    and their settings to `out` for a later `--completions` on a machine with rustc, and score nothing."""
    problem_set = load_problem_set(problems_source, strict)  # malformed files stop here, before anything runs
    problems = problem_set.problems
    if generate_only:
        if run is None:
            raise ValueError("generating completions only needs a model (--run)")
        return write_completions(run, problems, out, model_completions(
            run, problems, samples, temperature, max_tokens, seed, chat, experiences, top_p, batch_size, log), log)
    given = read_completions(completions_file, [p.name for p in problems]) if completions_file else None
    limits = Limits(allow_unisolated=allow_unisolated)
    iso = checked_isolation(limits)  # refuse before spending time on generation
    if given is not None:
        made_with = completions_file.with_name(SETTINGS_FILE)
        settings = {"completions": str(completions_file),
                    **(json.loads(made_with.read_text()) if made_with.exists() else {})}
        completions, out = given, out or Path("eval") / completions_file.stem
    elif run is None:  # the problems' canonical solutions: does the dataset check out?
        completions, settings = references(problems), {"completions": "the problems' canonical solutions"}
        out = out or Path("eval") / f"{Path(str(problems_source)).stem}_canonical"
    else:
        completions, settings = model_completions(run, problems, samples, temperature, max_tokens, seed, chat,
                                                  experiences, top_p, batch_size, log)
        out = out or Path(run if run.is_dir() else run.parent) / "eval_humaneval_rust"
    cut = run is not None or completions_file is not None
    by_name = {p.name: p for p in problems}
    bodies = {name: [stop_at_stop_tokens(c, by_name[name].stop_tokens) if cut else c for c in cs]
              for name, cs in completions.items()}
    programs = {name: [build_program(by_name[name], c, cut) for c in cs] for name, cs in completions.items()}
    log(f"sandbox: {iso.describe()}")
    bar = tqdm(total=sum(len(v) for v in completions.values()), desc="compile+run", unit="sample")
    results = score(problems, completions, workers=workers, limits=limits, progress=bar.update, cut=cut)
    bar.close()
    summary = summarize(results, list(ks), skipped=problem_set.skipped, bodies=bodies, settings=settings)
    write_reports(results, summary, out, f"HumanEval-Rust ({problems_source})", bodies, programs)
    log(", ".join(f"{k} {v:.3f}" for k, v in summary["pass@k"].items())
        + f", compile rate {summary['compile_rate']:.3f}, semantic correctness "
          f"{summary['semantic_correctness']:.3f}, placeholder bodies {summary['placeholder_share']:.3f} "
          f"(compile rate without them {summary['compile_rate_without_placeholders']:.3f}); outcomes "
          f"{summary['outcomes']}"
        + (f"; {len(problem_set.skipped)} problem(s) skipped as unscorable" if problem_set.skipped else "")
        + f" -> {out}")
    return {**summary, "out": str(out)}


def validation_bpb(source: Path, data: Path | None = None, batches: int = 0, batch_size: int = 0, log=print) -> dict:
    """Val loss and bits per byte of `source` (a run folder or a packed model file) on the held-out crates of
    `data` (a prepared-data folder; default: the run's own data), read as the trainer reads them: `batches`
    (default: the run's `eval.val_batches`) batches of `batch_size` (default: its `train.batch_size`)
    sequences of the model's context, from the start of the val split."""
    import torch

    from ternchat.config import load_config
    from ternchat.data.errors import DataError
    from ternchat.data.pipeline import prepare_data
    from ternchat.data.shards import shard_paths
    from ternchat.eval.bpb import held_out_bpb
    from ternchat.runs import load_model_and_tokenizer
    from ternchat.train.step import autocast_for

    source = Path(source)
    config_file = source / "config.toml" if (source / "config.toml").exists() else None
    if config_file is None and data is None:
        raise DataError(f"{source} does not say which data it was trained on: give its prepared-data folder (--data)")
    model, tok = load_model_and_tokenizer(source)
    overrides = [f"tokenizer.vocab_size={tok.vocab_size}"]
    if data is not None:
        overrides.append(f"data.prepared={json.dumps(str(Path(data).expanduser().resolve()))}")
    cfg = load_config(config_file, overrides)
    prepared = prepare_data(cfg, until="shards", log=log)
    if prepared.tokenizer.hash != tok.hash:
        raise DataError(f"{source} was trained with tokenizer {tok.hash}, the data's is {prepared.tokenizer.hash}: "
                        "give the prepared-data folder it was trained on (--data)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.float32, device=device)
    result = held_out_bpb(model, shard_paths(prepared.shard_dir, "val"), token_bytes,
                          batch_size or cfg.train.batch_size, model.shape.seq_len, batches or cfg.eval.val_batches,
                          autocast_for(cfg.train.dtype, device), tok.hash)
    log(f"val loss {result['val_loss']:.4f}, val bits per byte {result['val_bpb']:.4f} "
        f"({result['val_tokens']:,} held-out tokens) -> {source}")
    return result
