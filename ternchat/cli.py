"""The `ternchat` command: parse arguments, load the config, call one function per subcommand.

Exit status: 0 on success, 2 for a bad config or bad arguments (nothing is written), 1 for a
failure of the work itself (missing tools, corrupt data), each with one clear message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ternchat import __version__
from ternchat.config import SECTIONS, Config, ConfigError, describe, load_config, parse_bytes
from ternchat.data.errors import DataError
from ternchat.train.errors import RunError
from ternchat.verify.inputs import InputError
from ternchat.verify.sandbox import SandboxUnavailable


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config (default: the tiny_cpu preset built in)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config value, e.g. --set tokenizer.vocab_size=32768 (repeatable)")


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    return load_config(args.config, [*args.overrides, *extra])


def cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        for section in SECTIONS:
            print(f"[{section}]")
            for key, type_name, default, doc in describe(section):
                print(f"  {key:<20} {type_name:<14} default {default!r:<14} {doc}")
        return 0
    print(_config(args).to_toml(), end="")
    return 0


def _data_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.source:
        extra.append(f"data.sources={json.dumps(args.source)}")
    if args.debian:
        extra.append("data.debian=true")
        if args.debian != "curated":
            extra.append(f"data.debian_crates={json.dumps(args.debian)}")
    if args.no_debian:
        extra.append("data.debian=false")
    if args.crates_file:
        extra.append(f"data.debian_crates={json.dumps(args.crates_file)}")
    if args.debian_release:
        extra += ["data.debian=true", f"data.debian_releases={json.dumps(args.debian_release)}"]
    if args.rustc_src:
        extra.append("data.rustc_src=true")
    if args.rust_src:
        extra.append("data.rust_src=true")
    if args.no_auto:
        extra.append("data.auto_discover=false")
    if args.hf:
        extra.append(f"data.hf_dataset={json.dumps(args.hf)}")
    if args.vocab_size:
        extra.append(f"tokenizer.vocab_size={args.vocab_size}")
    return extra


def cmd_data(args: argparse.Namespace) -> int:
    from ternchat.data.pipeline import prepare_data

    cfg = _config(args, _data_overrides(args))
    if args.step == "verify":
        from ternchat.paths import ternchat_home
        from ternchat.verify.checked_data import TAGS, verify_corpus
        from ternchat.verify.sandbox import Limits, checked_isolation

        limits = Limits(allow_unisolated=args.allow_unisolated or cfg.eval.allow_unisolated)
        checked_isolation(limits)
        art = prepare_data(cfg, until="corpus", force=args.force)
        start = time.perf_counter()
        counts = verify_corpus(art.corpus_dir, ternchat_home() / "verify", args.limit, cfg.data.workers,
                               limits=limits)
        total = sum(counts["bytes"].values()) or 1
        print(f"compile tags of {counts['files']} files ({counts['checked_now']} checked now in "
              f"{time.perf_counter() - start:.0f} s): "
              + ", ".join(f"{tag} {counts[tag]} ({100 * counts['bytes'][tag] / total:.1f}% of bytes)"
                          for tag in TAGS)
              + f" -> {art.corpus_dir / 'compile_tags.jsonl'}")
        return 0
    if args.step == "functions":
        return _mine_functions(args, cfg)
    if args.export and args.step != "shards":
        raise DataError("--export writes the tokenizer and shards: run it with the shards step (the default)")
    art = prepare_data(cfg, until=args.step, force=args.force, eval_tokenizer=args.eval)
    if args.export:
        from ternchat.data.prepared import describe, export_prepared, folder_size

        manifest = export_prepared(Path(args.export), corpus_dir=art.corpus_dir, corpus_summary=art.corpus_summary,
                                   tokenizer=art.tokenizer, shard_dir=art.shard_dir,
                                   max_train_tokens=args.max_train_tokens)
        print(f"{describe(manifest)}\nexported to {args.export} ({folder_size(Path(args.export)) / 1e6:,.1f} MB); "
              f"train from it with `ternchat train --data {args.export}`")
        return 0
    print(f"data ready: corpus {art.corpus_dir}"
          + (f", tokenizer {art.tokenizer_dir}" if art.tokenizer_dir else "")
          + (f", shards {art.shard_dir}" if art.shard_dir else ""))
    return 0


def _mine_functions(args: argparse.Namespace, cfg: Config) -> int:
    from ternchat.data.pipeline import prepare_data
    from ternchat.verify.function_data import check_sample, mine_corpus

    corpus_dir = prepare_data(cfg, until="corpus", force=args.force).corpus_dir
    start = time.perf_counter()
    mined = mine_corpus(corpus_dir, args.against)
    print(f"documented functions in the train split: {mined['found']:,} found, {mined['dropped']:,} "
          f"dropped as resembling one of {mined['evaluation_problems']} evaluation problems, {mined['kept']:,} kept "
          f"({mined['with_examples']:,} with doc-test examples, {mined['examples']:,} examples) in "
          f"{time.perf_counter() - start:.0f} s -> {mined['out']}")
    if args.check:
        from ternchat.verify.sandbox import Limits, checked_isolation

        limits = Limits(allow_unisolated=args.allow_unisolated or cfg.eval.allow_unisolated)
        checked_isolation(limits)
        report = check_sample(mined["functions"], args.check, workers=cfg.data.workers or 2, limits=limits)
        for kind, r in report.items():
            share = r["compiles"] / r["checked"] if r["checked"] else 0.0
            codes = ", ".join(f"{code} {n}" for code, n in r["top_error_codes"]) or "none"
            print(f"  {kind}: {r['compiles']} of a sample of {r['checked']} compile alone ({100 * share:.0f}%); "
                  f"most frequent rustc errors: {codes}")
    return 0


def _print_result(result: dict) -> None:
    print(f"trained {result['steps']} steps, {result['tokens_seen']:,} tokens in {result['train_seconds'] / 60:.1f} min "
          f"({result['tok_s']:,.0f} tok/s), peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if "val_bpb" in result:
        print(f"final val loss {result['val_loss']:.4f}, val bits per byte {result['val_bpb']:.4f}")


def _run_overrides(args: argparse.Namespace) -> list[str]:
    extra = ["eval.allow_unisolated=true"] if args.allow_unisolated else []
    if getattr(args, "data", None):
        extra.append(f"data.prepared={json.dumps(str(Path(args.data).expanduser().resolve()))}")
    return [*args.overrides, *extra]


def cmd_train(args: argparse.Namespace) -> int:
    from ternchat.train.trainer import resolve_run, train

    cfg, run_dir = resolve_run(args.config, _run_overrides(args), args.run_dir, args.resume)
    result = train(cfg, run_dir, args.resume)
    if result:  # rank 0 of a torchrun job, or the only process
        _print_result(result)
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from ternchat.train.report import write_report
    from ternchat.train.trainer import resolve_run, train

    cfg, run_dir = resolve_run(args.config, _run_overrides(args), args.run_dir, args.resume)
    result = train(cfg, run_dir, args.resume)
    _print_result(result)
    print(f"report: {write_report(run_dir, cfg, result, result['samples'])}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ternchat.eval.chat import StopText, stream_text
    from ternchat.eval.decode_step import prepare_decoding
    from ternchat.eval.engine import SpeculationStats, generate
    from ternchat.runs import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.run)
    compiled_step = prepare_decoding(model, args.kernel, args.compile and not args.speculative)
    if args.speculative and model.mtp is None:
        print(f"error: --speculative needs a model trained with multi-token prediction ([mtp]); {args.run} has none",
              file=sys.stderr)
        return 2
    if args.exit_threshold is not None and model.loop is None:
        print(f"error: --exit-threshold needs a looped model ([loop]); {args.run} has none", file=sys.stderr)
        return 2
    stats, passes = SpeculationStats(), []
    count, start = 0, time.perf_counter()
    if args.fim_suffix is not None:  # fill in the middle: prefix and suffix in, the middle streamed between
        from ternchat.data.fim import fim_prompt

        prompt_ids = fim_prompt(args.prompt, args.fim_suffix, tok)
    else:
        prompt_ids = tok.encode(args.prompt)
    sys.stdout.write(args.prompt)

    def counted(tokens):
        nonlocal count
        for token in tokens:
            count += 1
            yield token

    tokens = generate(model, prompt_ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop_ids=[tok.eod_id], speculative=args.speculative,
                      stats=stats, exit_threshold=args.exit_threshold, passes_run=passes, compiled_step=compiled_step)
    for piece in StopText(args.stop).cut(stream_text(counted(tokens), tok)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if args.fim_suffix is not None:
        sys.stdout.write(args.fim_suffix)
    seconds = time.perf_counter() - start
    speculation = ""
    if args.speculative:
        speculation = (f", {stats.steps} verify steps, draft acceptance by depth "
                       f"{', '.join(f'{a:.0%}' for a in stats.acceptance())}")
    elif model.loop is not None and len(passes) > 1:  # the first entry is the prompt's, at full depth
        speculation = f", {sum(passes[1:]) / len(passes[1:]):.2f} of {model.shape.loop_steps} passes per token"
    print(f"\n[{count} tokens in {seconds:.2f}s, {count / max(seconds, 1e-9):.1f} tokens/s{speculation}]",
          file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ternchat.eval.chat import ChatSession, Sampling, run_terminal
    from ternchat.eval.decode_step import prepare_decoding
    from ternchat.runs import load_model_and_tokenizer, run_stage

    model, tok = load_model_and_tokenizer(args.run)
    chat_format = args.chat if args.chat is not None else run_stage(args.run) != "pretrain"
    sampling = Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    session = ChatSession(model, tok, chat_format, sampling, args.system,
                          prepare_decoding(model, args.kernel, args.compile))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_terminal(session, input, write)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ternchat.eval.serve import Limits, serve
    from ternchat.runs import load_model_and_tokenizer, run_stage

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve: listening on {args.host}: anyone who can reach this address can use the model", file=sys.stderr)
    model, tok = load_model_and_tokenizer(args.run)
    chat = args.chat if args.chat is not None else run_stage(args.run) != "pretrain"
    name = args.run.name if args.run.is_dir() else args.run.stem
    serve(model, tok, name, chat, args.host, args.port, Limits(args.max_tokens_limit, args.max_body_bytes),
          args.kernel, args.compile)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ternchat.runs import load_model_and_tokenizer

    if not args.run.is_dir():
        raise DataError(f"--run {args.run}: export takes a run folder")
    needs = {"hf": ("transformers", "accelerate"), "gguf": ("gguf",)}.get(args.format, ())
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise DataError(f"--format {args.format} needs {', '.join(missing)}: .venv/bin/pip install -e '.[export]'")
    model, tok = load_model_and_tokenizer(args.run)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.float_dtype or ("bf16" if args.format == "packed"
                                                                                  else "fp32")]
    if args.format == "hf":
        from ternchat.export.hf import check_logits, export_hf

        out = args.out or args.run / "hf"
        written = export_hf(model, tok, args.run / "tokenizer", out, dtype, args.layout)
        print(f"wrote {out}: {written['layout']}, {written['bytes'] / 2 ** 20:.2f} MiB"
              + ("; the MTP heads are not exported" if written["mtp_dropped"] else ""))
        if args.check:
            result = check_logits(out, model, tok, _check_texts())
            print(f"transformers ({result['class']}) against ternchat, fp32, {result['tokens']} positions: max |logit "
                  f"difference| {result['max_abs_logit_diff']:.3g}, {result['within_1e-4']} positions within 1e-4, "
                  f"same top token at {result['same_top_token']}; generate() greedy: {result['greedy_agree']} of "
                  f"{len(result['greedy_ternchat'])} tokens as ternchat's")
        return 0
    if args.format == "gguf":
        from ternchat.export.gguf import export_gguf

        out = args.out or args.run / f"model_{args.quant}.gguf"
        written = export_gguf(model, tok, out, args.quant, dtype, args.run.name)
        print(f"wrote {out}: llama.cpp bitnet, {args.quant.upper()} block matrices, {written['bytes'] / 2 ** 20:.2f} MiB"
              + ("; the MTP heads are not exported" if written["mtp_dropped"] else "")
              + f". Check it in llama.cpp: python scripts/check_gguf.py --run {args.run} --gguf {out}")
        return 0
    from ternchat.export.packed import export_packed
    from ternchat.runs import run_stage

    out = args.out or args.run / "model_packed.safetensors"
    sizes = export_packed(model, out, tok, dtype, stage=run_stage(args.run))
    mib = 2 ** 20
    print(f"wrote {out}: {sizes['packed_bytes'] / mib:.2f} MiB; the same model is {sizes['fp32_bytes'] / mib:.2f} MiB "
          f"in fp32 ({sizes['fp32_bytes'] / sizes['packed_bytes']:.1f}x) and {sizes['bf16_bytes'] / mib:.2f} MiB in "
          f"bf16 ({sizes['bf16_bytes'] / sizes['packed_bytes']:.1f}x). Ternary matrices "
          f"{sizes['ternary_bytes'] / mib:.2f} MiB, embedding, head and gains {sizes['other_bytes'] / mib:.2f} MiB, "
          f"tokenizer {sizes['tokenizer_bytes'] / mib:.2f} MiB: the file alone samples, chats, serves and evaluates.")
    return 0


def _check_texts() -> list[str]:
    """Texts to compare an export on: the evaluation problems' prompts (Rust the model was trained for)."""
    from ternchat.verify.humaneval import load_problems

    return [p.prompt for p in load_problems()[:4]]


def _report(args: argparse.Namespace, result: dict, format_table: Callable[[dict], str]) -> None:
    """Print a benchmark's table; with --out, also write what it measured as JSON."""
    print(format_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "optim":
        from ternchat.bench.optim_bench import bench_optim, format_report

        report = bench_optim(args.config, args.overrides, args.optim_steps, args.out_dir)
        print(format_report(report))
        print(f"loss curves: {args.out_dir / 'optim_loss.png'}")
        return 0
    if args.what == "dedup":
        from ternchat.bench.dedup_bench import bench_dedup, format_dedup
        from ternchat.data.pipeline import prepare_data

        cfg = _config(args)
        corpus = prepare_data(cfg, until="corpus").corpus_dir
        result = bench_dedup(corpus, cfg.data.minhash_perms, cfg.data.near_dup_threshold)
        _report(args, result, format_dedup)
        return 0
    if args.what == "sweep":
        from ternchat.bench.sweep import bench_sweep, format_sweep, parse_grid

        if not args.grid:
            raise ConfigError("bench sweep needs at least one --grid section.key=value1,value2,...")
        report = bench_sweep(args.config, args.overrides, parse_grid(args.grid), args.optim_steps)
        _report(args, report, format_sweep)
        return 0
    if args.what == "arch":
        from ternchat.bench.arch_bench import bench_arch, format_arch

        report = bench_arch(args.config, args.overrides, args.optim_steps)
        _report(args, report, format_arch)
        return 0
    if args.what == "fire":
        from ternchat.bench.fire_bench import bench_fire, format_fire

        if args.run is None:
            raise ConfigError("bench fire needs --run DIR (a trained run folder)")
        _report(args, bench_fire(args.run), format_fire)
        return 0
    if args.what == "loader":
        from ternchat.bench.loader_bench import bench_loader, format_loader

        _report(args, bench_loader(args.config, args.overrides, args.optim_steps, workers=args.workers or 1),
                format_loader)
        return 0
    if args.what == "gemm":
        from ternchat.bench.gemm_bench import bench_gemm, format_gemm

        _report(args, bench_gemm(), format_gemm)
        return 0
    if args.what in ("precision", "collider"):
        from ternchat.bench import gemm_bench

        bench = gemm_bench.bench_precision if args.what == "precision" else gemm_bench.bench_collider
        table = gemm_bench.format_precision if args.what == "precision" else gemm_bench.format_collider
        _report(args, bench(args.config, args.overrides, args.optim_steps), table)
        return 0
    if args.what == "decode":
        from ternchat.bench.decode_bench import bench_decode, format_decode

        _report(args, bench_decode(args.decode_tokens), format_decode)
        return 0
    if args.what == "mtp":
        from ternchat.bench.mtp_bench import bench_mtp, format_mtp

        report = bench_mtp(args.config, args.overrides, args.optim_steps, args.decode_tokens)
        _report(args, report, format_mtp)
        return 0
    if args.what == "dist":
        from ternchat.bench.dist_bench import bench_dist, format_dist

        result = bench_dist(args.config, args.overrides, args.optim_steps)
        _report(args, result, format_dist)
        return 0
    if args.what == "scale":
        from ternchat.bench.scale_bench import bench_scale, format_scale

        try:
            cap = parse_bytes(args.memory_cap) if args.memory_cap else None
        except ValueError as e:
            raise ConfigError(f"--memory-cap: {e}") from None
        result = bench_scale(_config(args), args.steps, args.warmup, cap, args.peak_tflops, args.cpu, args.profile)
        if result:  # rank 0
            _report(args, result, format_scale)
        return 0
    if args.what == "eval":
        from ternchat.bench.eval_bench import bench_eval, format_result

        result = bench_eval(args.problems, args.workers, args.baseline_problems, args.allow_unisolated)
        _report(args, result, format_result)
        return 0
    from ternchat.bench.train_bench import bench_train, format_table

    cfg = _config(args)
    result = bench_train(cfg, args.config, args.overrides, args.rounds, args.steps, args.warmup)
    _report(args, result, format_table)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ternchat.verify.humaneval import load_problem_set, references, score
    from ternchat.verify.inputs import read_completions
    from ternchat.verify.metrics import summarize, write_reports
    from ternchat.verify.sandbox import Limits, checked_isolation

    problem_set = load_problem_set(args.problems, args.strict)  # malformed files stop here, before anything runs
    problems = problem_set.problems
    given = read_completions(args.completions, [p.name for p in problems]) if args.completions else None
    limits = Limits(allow_unisolated=args.allow_unisolated)
    iso = checked_isolation(limits)  # refuse before spending time on generation
    ks = [int(k) for k in args.k.split(",")]
    if given is not None:
        completions = given
        out = args.out or Path("eval") / args.completions.stem
    elif args.run is None:  # score the problems' own canonical solutions: does the dataset check out?
        completions = references(problems)
        out = args.out or Path("eval") / f"{Path(str(args.problems)).stem}_canonical"
    else:
        from ternchat.eval.engine import chat_reply, complete
        from ternchat.runs import load_model_and_tokenizer, run_stage
        from ternchat.train.tfgrpo import Library, messages_with

        model, tok = load_model_and_tokenizer(args.run)
        temperature = 0.0 if args.samples == 1 and args.temperature is None else (args.temperature or 0.2)
        chat = args.chat if args.chat is not None else (run_stage(args.run) != "pretrain" or bool(args.experiences))
        library = Library.load(args.experiences) if args.experiences else Library()
        print(f"prompting {'in the chat format (the task as the user turn)' if chat else 'by plain completion'}"
              + (f", with {len(library.experiences)} experiences as the system message" if args.experiences else ""))

        def sample(p, seed: int) -> str:
            if chat:
                return chat_reply(model, tok, messages_with(library, p), args.max_tokens, p.stop_tokens,
                                  temperature=temperature, seed=seed)
            return complete(model, tok, p.prompt, args.max_tokens, p.stop_tokens, temperature=temperature, seed=seed)

        completions = {}
        for p in tqdm(problems, desc="generate", unit="problem"):
            completions[p.name] = [sample(p, args.seed + i) for i in range(args.samples)]
        out = args.out or Path(args.run if args.run.is_dir() else args.run.parent) / "eval_humaneval_rust"
    print(f"sandbox: {iso.describe()}")
    bar = tqdm(total=sum(len(v) for v in completions.values()), desc="compile+run", unit="sample")
    results = score(problems, completions, workers=args.workers, limits=limits, progress=bar.update,
                    cut=args.run is not None or args.completions is not None)
    bar.close()
    summary = summarize(results, ks, skipped=problem_set.skipped)
    write_reports(results, summary, out, f"HumanEval-Rust ({args.problems})")
    print(", ".join(f"{k} {v:.3f}" for k, v in summary["pass@k"].items())
          + f", compile rate {summary['compile_rate']:.3f}, semantic correctness "
            f"{summary['semantic_correctness']:.3f}; outcomes {summary['outcomes']}"
          + (f"; {len(problem_set.skipped)} problem(s) skipped as unscorable" if problem_set.skipped else "")
          + f" -> {out}")
    return 0


def default_tasks_file() -> Path:
    from ternchat.paths import ternchat_home

    return ternchat_home() / "tasks" / "train_tasks.jsonl"


def _build_tasks(out: Path, against: Sequence[str], workers: int, allow_unisolated: bool) -> dict:
    from ternchat.verify.sandbox import Limits, checked_isolation
    from ternchat.verify.tasks import build_training_tasks

    limits = Limits(allow_unisolated=allow_unisolated)
    print(f"sandbox: {checked_isolation(limits).describe()}")
    report = build_training_tasks(out, against, workers, limits=limits)
    for name, why in {**report["dropped_as_duplicates"], **report["failed_verification"]}.items():
        print(f"  dropped {name}: {why}")
    print(f"{report['kept']} of {report['generated']} tasks kept -> {out}")
    return report


def cmd_tasks(args: argparse.Namespace) -> int:
    _build_tasks(args.out or default_tasks_file(), args.against, args.workers, args.allow_unisolated)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from ternchat.data.pipeline import prepare_data
    from ternchat.train.sft import sft

    _require_checkpoint(args.run)
    tasks = _training_tasks(args.tasks, args.allow_unisolated)
    corpus_dir = None
    if not args.no_corpus:
        parent_config = args.run / "config.toml"
        cfg = load_config(parent_config if parent_config.exists() else None)
        corpus_dir = prepare_data(cfg, until="corpus").corpus_dir
    out = args.out or args.run.with_name(args.run.name + "_sft")
    result = sft(args.run, out, tasks, corpus_dir, args.overrides, args.resume)
    vals = result["val_losses"]
    print(f"SFT: {result['steps']} steps in {result['seconds']:.0f} s; held-out loss "
          + (f"{vals[0]:.4f} -> {vals[-1]:.4f}" if vals else "not measured (no held-out conversations)")
          + f" -> {out}")
    return 0


def _require_checkpoint(run: Path) -> None:
    """Stop before building tasks or data when the run to start from has nothing to load."""
    from ternchat.train.checkpoint import latest_checkpoint

    if not run.is_dir() or latest_checkpoint(run) is None:
        raise DataError(f"{run} has no checkpoint to start from; train it first (ternchat train)")


def _training_tasks(path: Path | None, allow_unisolated: bool) -> list:
    from ternchat.verify.humaneval import load_problems

    tasks_file = path or default_tasks_file()
    if not tasks_file.exists():
        if path:
            raise DataError(f"no tasks file at {tasks_file}; make one with ternchat tasks --out {tasks_file}")
        _build_tasks(tasks_file, [], 0, allow_unisolated)
    return load_problems(tasks_file)


def cmd_rl(args: argparse.Namespace) -> int:
    from ternchat.train.rl import rl
    from ternchat.verify.sandbox import Limits, checked_isolation

    _require_checkpoint(args.run)
    limits = Limits(allow_unisolated=args.allow_unisolated)
    checked_isolation(limits)  # refuse before loading anything
    out = args.out or args.run.with_name(args.run.name + "_rl")
    result = rl(args.run, out, _training_tasks(args.tasks, args.allow_unisolated), args.overrides, args.resume,
                limits, args.workers)
    first, last = result["history"][:1], result["history"][-1:]
    if first:
        print(f"RL: {result['steps']} steps in {result['seconds']:.0f} s; mean reward {first[0]['mean_reward']:.3f} "
              f"(first step) -> {last[0]['mean_reward']:.3f} (last) -> {out}")
    return 0


def cmd_tfgrpo(args: argparse.Namespace) -> int:
    from ternchat.runs import load_model_and_tokenizer
    from ternchat.train.tfgrpo import model_policy, tfgrpo
    from ternchat.verify.sandbox import Limits, checked_isolation

    _require_checkpoint(args.run)
    limits = Limits(allow_unisolated=args.allow_unisolated)
    checked_isolation(limits)
    t = load_config(None, args.overrides).tfgrpo
    model, tok = load_model_and_tokenizer(args.run)
    out = args.out or args.run / "tfgrpo"
    result = tfgrpo(model_policy(model, tok, t.max_tokens, t.temperature),
                    _training_tasks(args.tasks, args.allow_unisolated), out, steps=t.steps,
                    tasks_per_step=t.tasks_per_step, group_size=t.group_size, per_task=t.per_task,
                    max_experiences=t.max_experiences, seed=t.seed, limits=limits, workers=args.workers, model=model)
    for h in result["history"]:
        print(f"step {h['step']}: pass rate {h['pass_rate']:.3f}, {h['mixed_groups']} mixed groups, "
              f"{len(h['operations'])} operations, {h['experiences']} experiences")
    print(f"weights unchanged (sha256 {result['weights_sha256'][:16]}); library -> {result['out']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ternchat.plan import format_plan, measure_cpu, plan_memory

    cfg = _config(args)
    vocab = cfg.tokenizer.vocab_size
    hw = cfg.hardware
    gpus = args.gpus or hw.gpus
    memory = args.gpu_mem or hw.gpu_memory
    try:
        budget = parse_bytes(memory) if memory else None
    except ValueError as e:
        raise ConfigError(f"--gpu-mem: {e}") from None
    device = "cpu" if args.measure else "cuda"
    host = parse_bytes(hw.host_memory) if hw.host_memory and not args.gpu_mem else None
    plan = plan_memory(cfg, vocab, args.micro_batch, budget, gpus, device, host)
    recompute = cfg.train.activation_checkpointing
    title = (f"{args.config or 'tiny_cpu (built-in)'}" + (f" on {hw.name}" if hw.name and not args.gpu_mem else "")
             + (f", activation checkpointing {recompute}" if recompute != "none" else ""))
    print(format_plan(plan, title, gpus, cfg.dist.strategy))
    if args.measure:
        measured = measure_cpu(cfg, vocab, plan.micro_batch)
        peak, rss = measured["tensor_peak"], measured["rss_added"]
        print(f"\nmeasured on this CPU: peak tensor bytes {peak / 2**30:,.3f} GiB (planned {plan.total / 2**30:,.3f}, "
              f"{100 * (plan.total - peak) / peak:+.1f}%); peak RSS added {rss / 2**30:,.3f} GiB "
              f"(planned {100 * (plan.total - rss) / rss:+.1f}%: RSS also holds the C allocator's cache)")
    return 0


def _add_unisolated_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unisolated", action="store_true",
                   help="compile and run untrusted Rust even where bubblewrap's namespaces are unavailable: the "
                        "programs can then read this user's files and reach the network (default: refuse)")


def _add_stage_args(p: argparse.ArgumentParser, run_help: str, out_help: str, example: str, resume: bool,
                    workers: bool) -> None:
    """The options of the post-training commands (sft, rl, tfgrpo)."""
    p.add_argument("--run", type=Path, required=True, metavar="DIR", help=run_help)
    p.add_argument("--out", type=Path, metavar="DIR", help=out_help)
    p.add_argument("--tasks", type=Path, metavar="FILE", help="training tasks (default: built by ternchat tasks)")
    if workers:
        p.add_argument("--workers", type=int, default=0, help="parallel sandboxes (default: all cores)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue --out from its latest checkpoint")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help=f"override a config value, e.g. --set {example} (repeatable)")
    _add_unisolated_arg(p)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", choices=["auto", "int8", "int2", "float"], default="auto",
                   help="ternary linears: int8 GEMM on the codes, the 2-bit C++ kernel (fastest on a CPU; built on "
                        "first use), or the exact float kernel of training; auto: int8 on a CPU, float on a GPU")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step (a one-time cost of tens of seconds, then faster tokens)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--data", metavar="DIR", help="train from a prepared-data folder (`ternchat data --export DIR`): "
                                                 "no sources, apt or network needed (sets data.prepared)")
    p.add_argument("--run-dir", metavar="DIR", help="run folder (default: runs/<train.run_name>)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    _add_unisolated_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ternchat", description="Train, evaluate and run small ternary-weight language models for Rust code.")
    parser.add_argument("--version", action="version", version=f"ternchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", help="build the Rust corpus, tokenizer and token shards (cached)",
                       description="Run the data pipeline up to STEP (default: all of it). Steps whose "
                                   "inputs did not change are skipped. Data lives under $TERNCHAT_HOME "
                                   "(default ~/.cache/ternchat).")
    p.add_argument("step", nargs="?", default="shards",
                   choices=["corpus", "tokenizer", "shards", "verify", "functions"],
                   help="last step to run: corpus, tokenizer or shards (default: shards, i.e. everything); "
                        "verify tags the corpus files by what rustc says (compiles / parses / syntax_error); "
                        "functions mines documented functions and doc-test examples for SFT")
    _add_config_args(p)
    p.add_argument("--source", action="append", metavar="DIR", default=[],
                   help="a directory of Rust sources to add (repeatable)")
    p.add_argument("--debian", nargs="?", const="curated", metavar="LIST",
                   help="use crates from Debian's librust-*-dev packages: the ~166 curated ones (~100 MB; on by "
                        "default in the shipped presets), or with LIST 'all' every real-crate package of this "
                        "Debian release (~1,400 in Debian 12), or a file of package names")
    p.add_argument("--no-debian", action="store_true", help="do not fetch the curated Debian crates")
    p.add_argument("--crates-file", metavar="FILE", help="with --debian: a file of package names to use instead")
    p.add_argument("--debian-release", action="append", metavar="NAME", default=[],
                   help="take --debian's crates from this Debian release (e.g. trixie) through private apt lists, "
                        "never the system's; repeat to combine releases (the newest copy of a crate is kept)")
    p.add_argument("--rustc-src", action="store_true",
                   help="add Rust's own sources from Debian's rustc source package: library, compiler, tools and "
                        "the UI tests, tagged by their annotations as expected to compile or to fail")
    p.add_argument("--rust-src", action="store_true", help="add the standard library's sources (Debian's rust-src)")
    p.add_argument("--no-auto", action="store_true",
                   help="do not scan this machine's Rust sources (Debian registry, rust-src, ~/.cargo)")
    p.add_argument("--hf", metavar="DATASET", help="add Rust files from a Hugging Face dataset ('hf' extra)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="tokenizer vocabulary size")
    p.add_argument("--eval", action="store_true", help="report tokenizer bytes/token on val and encode MB/s")
    p.add_argument("--force", action="store_true", help="rebuild the steps even if their inputs are unchanged")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="verify: only the first N files of each split")
    p.add_argument("--check", type=int, default=100, metavar="N",
                   help="functions: compile a sample of N functions and N examples alone in the sandbox (0 = none)")
    p.add_argument("--against", action="append", default=[], metavar="FILE",
                   help="functions: another evaluation set to keep out, e.g. humaneval-rs.jsonl (repeatable)")
    p.add_argument("--export", metavar="DIR", help="also write a prepared-data folder (tokenizer, shards, manifest) "
                                                   "that `ternchat train --data DIR` uses on any machine")
    p.add_argument("--max-train-tokens", type=int, default=0, metavar="N",
                   help="with --export: about the first N train tokens only, at a document boundary (val is whole)")
    _add_unisolated_arg(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (builds the data first if needed)",
                       description="Train the configured model; metrics, checkpoints and samples go to the run "
                                   "folder. --resume continues from the latest checkpoint exactly.")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("speedrun", help="the main job: data, ~10 minutes of training, eval, samples, report.md",
                       description="Build the data if missing, train the tiny_cpu preset (or --config) for its "
                                   "time budget, evaluate val bits per byte, sample, and write report.md.")
    _add_run_args(p)
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("sample", help="generate Rust from a trained model",
                       description="Stream a completion of --prompt from a run folder (latest checkpoint) or a "
                                   "packed model file.")
    p.add_argument("--run", type=Path, required=True, metavar="PATH", help="run folder or packed .safetensors")
    p.add_argument("--prompt", required=True, help="the text to continue (with --fim-suffix: the prefix)")
    p.add_argument("--fim-suffix", metavar="TEXT", default=None,
                   help="fill in the middle: generate what goes between --prompt and TEXT (a model trained with "
                        "loader.fim_rate > 0); prints prefix, middle and suffix")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    _add_decode_args(p)
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding: the model's MTP heads or modules draft, the main head verifies "
                        "(greedy output identical to plain decoding; samples from the same distribution)")
    p.add_argument("--exit-threshold", type=float, default=None, metavar="Q",
                   help="a looped model ([loop]): Q-exit, stop each token's passes once the cumulative exit "
                        "probability reaches Q (1 = every pass); default: the run's loop.exit_threshold")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("chat", help="talk to a trained model in the terminal",
                       description="A multi-turn chat with streamed replies in the chat format for runs made by "
                                   "ternchat sft or rl; for a pretrained run each line is continued as a prompt. "
                                   "/reset starts over, /quit or end of input leaves.")
    p.add_argument("--run", type=Path, required=True, metavar="PATH", help="run folder or packed .safetensors")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the chat format (default: for runs made by ternchat sft or rl)")
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    _add_decode_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a web chat page and an OpenAI-compatible API",
                       description="One process: the chat page at / and /v1/chat/completions, /v1/completions and "
                                   "/v1/models in OpenAI's shapes (streamed or whole). Binds 127.0.0.1 unless "
                                   "--host says otherwise.")
    p.add_argument("--run", type=Path, required=True, metavar="PATH", help="run folder or packed .safetensors")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the chat format (default: for runs made by ternchat sft or rl)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the most tokens one request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    _add_decode_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run's model: packed ternary, Hugging Face or GGUF",
                       description="packed: ternchat's own file, ternary weights 5 trits per byte (1.6 bits), "
                                   "embedding and head in bf16. hf: a transformers folder (config, safetensors "
                                   "with 2-bit codes, tokenizer, chat template): native BitNetForCausalLM for "
                                   "mlp=relu2_glu and qk_norm=false, remote code otherwise. gguf: llama.cpp's "
                                   "bitnet graph with TQ2_0/TQ1_0 matrices (mlp=swiglu, qk_norm=false, "
                                   "tie_embeddings=true, d_model and d_ff multiples of 256).")
    p.add_argument("--run", type=Path, required=True, metavar="DIR", help="run folder")
    p.add_argument("--format", choices=["packed", "hf", "gguf"], default="packed")
    p.add_argument("--quant", choices=["tq2_0", "tq1_0"], default="tq2_0",
                   help="gguf: llama.cpp's ternary type (TQ2_0: 2 bits per weight, TQ1_0: 1.69)")
    p.add_argument("--float-dtype", choices=["bf16", "fp32"], default=None,
                   help="dtype of embedding and head (default: bf16 for packed, fp32 for hf and gguf, where "
                        "bf16 writes F16; fp32 keeps the checkpoint's logits)")
    p.add_argument("--layout", choices=["auto", "native", "remote"], default="auto",
                   help="hf: native BitNetForCausalLM, ternchat's remote code, or native when the knobs allow")
    p.add_argument("--check", action="store_true",
                   help="hf: load the export with transformers and compare its logits with ternchat's")
    p.add_argument("--out", type=Path, help="output path (default: RUN/model_packed.safetensors, RUN/hf, RUN/model_<quant>.gguf)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="benchmarks against baselines measured in the same run",
                       description="bench train: tokens/s and peak memory of a dense fp32 AdamW baseline (a), "
                                   "dense bf16 compiled (b) and ternchat's ternary Muon model (c), eager and "
                                   "compiled, at the config's shape, with ratios. bench eval: evaluations/s of "
                                   "the sandboxed HumanEval-Rust harness against plain one-at-a-time rustc. "
                                   "bench optim: seven optimizer setups on the same model, seed and batches. "
                                   "bench sweep: the same for each point of a grid of config values. bench dedup: "
                                   "near-duplicate sketches, rensa against datasketch (if installed). bench dist: "
                                   "one process against two torchrun ranks (DDP, FSDP2) on the same global batch. "
                                   "bench scale: a config's real model for a few steps on a GPU (optionally "
                                   "capped to a smaller card): tok/s, MFU and peak memory against the plan. "
                                   "bench mtp: the model without MTP, with heads and with modules (val bpb), and "
                                   "speculative against plain decoding from the MTP models. bench arch: the plain "
                                   "model against mHC, unconstrained HC, LoopLM (T 2, 4) and mHC with LoopLM. "
                                   "bench precision: high-precision GEMMs against each [fp4] recipe. bench gemm: "
                                   "bf16 against FP8 GEMM TFLOP/s on CUDA. bench collider: "
                                   "step times and val bpb at 0/20/40/60% of tokens filtered. bench loader: data wait "
                                   "per step with 10% slow samples, in-process and in-order loaders against "
                                   "MinatoLoader. bench fire: a trained run's val bpb and ternary codes before and "
                                   "after FIRE (exact and the official 5 Newton-Schulz steps).")
    p.add_argument("what", choices=["train", "eval", "optim", "sweep", "dedup", "dist", "scale", "mtp", "arch",
                                    "precision", "gemm", "collider", "loader", "fire", "decode"],
                   help="train: training throughput and memory; eval: sandboxed compile+run evaluations per second; "
                        "optim: the memory-efficient optimizers against Muon and AdamW; sweep: validation loss "
                        "over a grid of config values; dedup: rensa's MinHash against datasketch's on the corpus; "
                        "dist: tokens/s of 1 process vs 2 ranks; scale: a preset's model on a GPU against its plan; "
                        "mtp: multi-token prediction's val bpb and speculative decoding; arch: mHC and LoopLM "
                        "against the plain model (val bpb, tok/s, memory, composite gain, Q-exit); precision: FP4/FP8 "
                        "recipes (val bpb, loss curve, quantization error, GPU GEMM throughput); gemm: the GPU GEMM rows alone; collider: backward "
                        "and step time and val bpb per filtered fraction; loader: the share of step time spent "
                        "waiting for data with slow samples, per loader; fire: FIRE's effect on a trained run's "
                        "val bpb and ternary codes; decode: batch-1 decoding tok/s and peak memory, dense bf16, "
                        "ternary float and int8 kernels, llama.cpp TQ2_0/TQ1_0")
    p.add_argument("--optim-steps", type=int, default=100,
                   help="optim, sweep, dist, mtp, arch, precision, collider, loader: training steps per run")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="mtp: tokens decoded per sample prompt; decode: tokens decoded per variant")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="sweep: values to try for one key (repeatable; the runs cover every combination)")
    p.add_argument("--out-dir", type=Path, default=Path("bench_optim"), help="optim: folder for JSON and PNG")
    _add_config_args(p)
    p.add_argument("--problems", default="rust_basics", help="eval: problem set (rust_basics, hf or a file)")
    p.add_argument("--workers", type=int, default=0, help="eval: parallel sandboxes (default: all cores); loader: "
                                                          "worker processes (default 1)")
    p.add_argument("--baseline-problems", type=int, default=0, metavar="N",
                   help="eval: run the unsandboxed one-at-a-time baseline on the first N programs only (0 = all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each variant runs --steps steps per round")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compilation)")
    p.add_argument("--memory-cap", metavar="BYTES", help="scale: let the process allocate only this much GPU "
                                                           "memory, e.g. 24GiB for a 4090 on a larger card")
    p.add_argument("--peak-tflops", type=float, help="scale: the device's dense bf16 peak for MFU (default: "
                                                     "the datasheet figure for known GPUs)")
    p.add_argument("--cpu", action="store_true", help="scale: run on the CPU (a check of the code path)")
    p.add_argument("--profile", type=Path, metavar="FILE", help="scale: write the last step's profiler tables here")
    p.add_argument("--run", type=Path, metavar="DIR", help="fire: the trained run folder")
    p.add_argument("--out", type=Path, help="also write the measurements as JSON")
    _add_unisolated_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="compiler-verified evaluation (HumanEval-Rust pass@k)",
                       description="humaneval-rust: generate completions with a trained model (--run), read "
                                   "them (--completions) or take the problems' canonical solutions (neither), "
                                   "compile and run each in the rustc sandbox, and report pass@k, compile rate, "
                                   "semantic correctness and rustc error codes.")
    p.add_argument("what", choices=["humaneval-rust"])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", type=Path, metavar="PATH", help="run folder or packed model to sample from")
    source.add_argument("--completions", type=Path, metavar="FILE",
                        help='JSONL of {"name", "completion"} or {"name", "completions": [...]} ("name" is the '
                             "task_id in the test-module layout); with neither --run nor --completions the "
                             "problems' canonical solutions are scored")
    p.add_argument("--problems", default="rust_basics",
                   help="rust_basics (shipped), hf (nuprl/MultiPL-E humaneval-rs), or a JSON/JSONL file in "
                        "MultiPL-E's layout (name, prompt, tests) or the test-module layout (task_id, prompt, "
                        "canonical_solution, test with #[test] functions, entry_point, optional edition)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a problem file with a problem that cannot be scored (a test module without a "
                        "#[test] function) instead of skipping it with a warning")
    p.add_argument("--samples", type=int, default=1, help="completions per problem")
    p.add_argument("--k", default="1", help="comma-separated k of pass@k, e.g. 1,10")
    p.add_argument("--temperature", type=float, default=None, help="default: greedy for 1 sample, else 0.2")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="parallel sandboxes (default: all cores)")
    p.add_argument("--out", type=Path, help="report folder")
    p.add_argument("--experiences", type=Path, metavar="FILE",
                   help="a Training-Free GRPO library (ternchat tfgrpo) to put in the prompt as a system message")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt in the chat format, the problem as the user turn (default: for runs made by "
                        "ternchat sft or rl)")
    _add_unisolated_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tasks", help="build the training tasks for post-training (never the evaluation problems)",
                       description="Generate small Rust tasks with reference solutions and tests, drop those that "
                                   "resemble the shipped problems or an --against set, check in the sandbox that "
                                   "each reference passes and a default body fails, and write JSONL in MultiPL-E's "
                                   "layout.")
    p.add_argument("--out", type=Path, help="output JSONL (default: $TERNCHAT_HOME/tasks/train_tasks.jsonl)")
    p.add_argument("--against", action="append", default=[], metavar="FILE",
                   help="another evaluation set to keep out, e.g. humaneval-rs.jsonl (repeatable)")
    p.add_argument("--workers", type=int, default=0, help="parallel sandboxes (default: all cores)")
    _add_unisolated_arg(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("sft", help="supervised fine-tuning of a pretrained run on chat conversations",
                       description="Start from --run's latest checkpoint (FIRE first with --set fire.at_sft=true), "
                                   "train on the training tasks and documented corpus functions as conversations, "
                                   "loss on the assistant's tokens only, and write a new run folder.")
    _add_stage_args(p, "the pretrained run folder", "the new run folder (default: DIR_sft)", "sft.steps=500",
                    resume=True, workers=False)
    p.add_argument("--no-corpus", action="store_true", help="train on the tasks only, no corpus functions")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rl", help="GRPO with rustc rewards on the training tasks",
                       description="Start from --run's latest checkpoint (an SFT run; FIRE first with --set "
                                   "fire.at_rl=true), sample groups of replies to training tasks, reward them in "
                                   "the rustc sandbox (tests pass: 1, compiles: rl.compile_reward, else 0) and "
                                   "update with the GRPO loss; writes a new run folder.")
    _add_stage_args(p, "the run to start from (usually SFT)", "the new run folder (default: DIR_rl)",
                    "rl.steps=50", resume=True, workers=True)
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("tfgrpo", help="Training-Free GRPO (adapted): learn an experience library, weights frozen",
                       description="Sample groups of replies to training tasks with the current experience library "
                                   "in the prompt, score them in the rustc sandbox, and turn the error codes that "
                                   "only failing replies of mixed groups show into add/modify operations, merged "
                                   "per batch; the model's weights are checked unchanged. Writes experiences.json "
                                   "for ternchat eval --experiences.")
    _add_stage_args(p, "the run whose model is frozen", "where experiences.json goes (default: DIR/tfgrpo)",
                    "tfgrpo.steps=5", resume=False, workers=True)
    p.set_defaults(func=cmd_tfgrpo)

    p = sub.add_parser("plan", help="memory plan per device: weights, gradients, optimizer state, activations",
                       description="Estimate the bytes a training run needs per device and whether it fits; "
                                   "--measure checks the estimate against a real run on this CPU.")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, help="devices (data parallel; default: the config's hardware.gpus)")
    p.add_argument("--gpu-mem", metavar="SIZE",
                   help="memory per device, e.g. 24GiB (default: the config's hardware.gpu_memory)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: train.batch_size)")
    p.add_argument("--measure", action="store_true", help="also run two steps on this CPU and compare (small models)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="print the resolved config, or all keys with --keys",
                       description="Load and validate a config (with --set overrides) and print it as TOML.")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every section and key with its type and default")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ternchat: config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"ternchat: input error: {e}", file=sys.stderr)
        return 2
    except (DataError, RunError, SandboxUnavailable) as e:
        print(f"ternchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ternchat: interrupted; completed steps are kept and the next run resumes from them",
              file=sys.stderr)
        return 130
