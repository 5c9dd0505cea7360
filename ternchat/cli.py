"""The `ternchat` command: parse arguments, load the config, call one function per subcommand.

Exit status: 0 on success, 2 for a bad config or bad arguments (nothing is written), 1 for a
failure of the work itself (missing tools, corrupt data), each with one clear message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ternchat import __version__
from ternchat.config import SECTIONS, Config, ConfigError, describe, load_config
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
        from ternchat.verify.checked_data import verify_configured_corpus

        verify_configured_corpus(cfg, args.limit, args.force, args.allow_unisolated)
        return 0
    if args.step == "functions":
        from ternchat.verify.function_data import mine_configured_corpus

        mine_configured_corpus(cfg, args.against, args.check, args.force, args.allow_unisolated)
        return 0
    if args.export and args.step != "shards":
        raise DataError("--export writes the tokenizer and shards: run it with the shards step (the default)")
    art = prepare_data(cfg, until=args.step, force=args.force, eval_tokenizer=args.eval)
    if args.export:
        from ternchat.data.prepared import export_artifacts

        from ternchat.verify.tasks import default_tasks_file

        tasks_file = args.tasks or (default_tasks_file() if default_tasks_file().exists() else None)
        export_artifacts(art, Path(args.export), args.max_train_tokens, args.max_functions, tasks_file)
        return 0
    print(f"data ready: corpus {art.corpus_dir}"
          + (f", tokenizer {art.tokenizer_dir}" if art.tokenizer_dir else "")
          + (f", shards {art.shard_dir}" if art.shard_dir else ""))
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
    from ternchat.speedrun import speedrun
    from ternchat.train.trainer import resolve_run

    cfg, run_dir = resolve_run(args.config, [*_run_overrides(args), "eval.report=true"], args.run_dir, args.resume)
    result = speedrun(cfg, run_dir, args.resume)
    _print_result(result)
    if "model_file" in result:
        print(f"model file: {result['model_file']}")
    print(f"report: {result['report']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ternchat.eval.chat import Sampling, stream_sample
    from ternchat.eval.decode_step import prepare_decoding
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

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    sampling = Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    done = stream_sample(model, tok, args.prompt, sampling, write, stop=args.stop, fim_suffix=args.fim_suffix,
                         speculative=args.speculative, exit_threshold=args.exit_threshold, compiled_step=compiled_step)
    print(f"\n{done}", file=sys.stderr)
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
    from ternchat.export.formats import check_export_tools, export_model
    from ternchat.runs import load_model_and_tokenizer, run_stage

    if not args.run.is_dir():
        raise DataError(f"--run {args.run}: export takes a run folder")
    check_export_tools(args.format)
    model, tok = load_model_and_tokenizer(args.run)
    export_model(model, tok, args.run, args.format, args.out, quant=args.quant, float_dtype=args.float_dtype,
                 layout=args.layout, check=args.check, stage=run_stage(args.run))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ternchat.bench.registry import BENCHMARKS, format_result

    result = BENCHMARKS[args.what].run(args)
    if result is not None:  # None: a torchrun rank other than 0
        print(format_result(args.what, result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ternchat.evaluation import evaluate, validation_bpb

    if args.what == "bpb":
        if args.run is None:
            raise DataError("eval bpb measures a model: give --run (a run folder or a packed model file)")
        validation_bpb(args.run, args.data, args.batches, args.batch_size or 0)
        return 0
    evaluate(args.problems, run=args.run, completions_file=args.completions, strict=args.strict,
             samples=args.samples, ks=[int(k) for k in args.k.split(",")], temperature=args.temperature,
             max_tokens=args.max_tokens, seed=args.seed, workers=args.workers, out=args.out,
             experiences=args.experiences, chat=args.chat, allow_unisolated=args.allow_unisolated, top_p=args.top_p,
             batch_size=args.batch_size or 8, generate_only=args.generate_only)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from ternchat.verify.tasks import build_tasks_file, default_tasks_file

    build_tasks_file(args.out or default_tasks_file(), args.against, args.workers, args.allow_unisolated)
    return 0


def run_config(run: Path) -> Config:
    """The config a run folder was trained with (the defaults for a folder without one)."""
    return load_config(run / "config.toml" if (run / "config.toml").exists() else None)


def cmd_sft(args: argparse.Namespace) -> int:
    from ternchat.train.checkpoint import required_checkpoint
    from ternchat.train.sft import sft, sft_corpus
    from ternchat.train.stage import stage_tasks

    required_checkpoint(args.run)
    cfg = run_config(args.run)
    tasks = stage_tasks(cfg, args.tasks, args.allow_unisolated)
    corpus_dir = None if args.no_corpus else sft_corpus(cfg)
    out = args.out or args.run.with_name(args.run.name + "_sft")
    result = sft(args.run, out, tasks, corpus_dir, args.overrides, args.resume)
    vals = result["val_losses"]
    print(f"SFT: {result['steps']} steps in {result['seconds']:.0f} s; held-out loss "
          + (f"{vals[0]:.4f} -> {vals[-1]:.4f}" if vals else "not measured (no held-out conversations)")
          + f" -> {out}")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from ternchat.train.checkpoint import required_checkpoint
    from ternchat.train.rl import rl
    from ternchat.train.stage import stage_tasks
    from ternchat.verify.sandbox import Limits, checked_isolation

    required_checkpoint(args.run)
    limits = Limits(allow_unisolated=args.allow_unisolated)
    checked_isolation(limits)  # refuse before loading anything
    out = args.out or args.run.with_name(args.run.name + "_rl")
    result = rl(args.run, out, stage_tasks(run_config(args.run), args.tasks, args.allow_unisolated), args.overrides,
                args.resume, limits, args.workers)
    first, last = result["history"][:1], result["history"][-1:]
    if first:
        print(f"RL: {result['steps']} steps in {result['seconds']:.0f} s; mean reward {first[0]['mean_reward']:.3f} "
              f"(first step) -> {last[0]['mean_reward']:.3f} (last) -> {out}")
    return 0


def cmd_tfgrpo(args: argparse.Namespace) -> int:
    from ternchat.runs import load_model_and_tokenizer
    from ternchat.train.checkpoint import required_checkpoint
    from ternchat.train.stage import stage_tasks
    from ternchat.train.tfgrpo import model_policy, tfgrpo
    from ternchat.verify.sandbox import Limits, checked_isolation

    required_checkpoint(args.run)
    limits = Limits(allow_unisolated=args.allow_unisolated)
    checked_isolation(limits)
    t = load_config(None, args.overrides).tfgrpo
    model, tok = load_model_and_tokenizer(args.run)
    out = args.out or args.run / "tfgrpo"
    result = tfgrpo(model_policy(model, tok, t.max_tokens, t.temperature),
                    stage_tasks(run_config(args.run), args.tasks, args.allow_unisolated), out, steps=t.steps,
                    tasks_per_step=t.tasks_per_step, group_size=t.group_size, per_task=t.per_task,
                    max_experiences=t.max_experiences, seed=t.seed, limits=limits, workers=args.workers, model=model)
    for h in result["history"]:
        print(f"step {h['step']}: pass rate {h['pass_rate']:.3f}, {h['mixed_groups']} mixed groups, "
              f"{len(h['operations'])} operations, {h['experiences']} experiences")
    print(f"weights unchanged (sha256 {result['weights_sha256'][:16]}); library -> {result['out']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ternchat.plan import plan_report

    print(plan_report(_config(args), args.config, args.gpus, args.gpu_mem, args.micro_batch, args.measure))
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
    p.add_argument("--max-functions", type=int, default=0, metavar="N",
                   help="with --export: a seeded sample of N of the corpus's mined functions for SFT (0 = all)")
    p.add_argument("--tasks", type=Path, default=None, metavar="FILE",
                   help="with --export: the training tasks file to include (default: `ternchat tasks`' file when "
                        "it exists)")
    _add_unisolated_arg(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (builds the data first if needed)",
                       description="Train the configured model; metrics, checkpoints and samples go to the run "
                                   "folder. --resume continues from the latest checkpoint exactly.")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("speedrun", help="the main job: data, ~10 minutes of training, eval, samples, report.md",
                       description="Build the data if missing, train the tiny_cpu preset (or --config) for its "
                                   "time budget, evaluate val bits per byte, sample, and write report.md; with "
                                   "[speedrun] sft and export (configs/speedrun_gpu.toml), SFT after it and the "
                                   "packed model file of the last stage.")
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

    from ternchat.bench.registry import BENCHMARKS

    p = sub.add_parser("bench", help="benchmarks against baselines measured in the same run",
                       description="Each benchmark measures ternchat against a baseline in the same run: "
                                   + "; ".join(f"{name}: {b.help}" for name, b in BENCHMARKS.items()) + ".")
    p.add_argument("what", choices=list(BENCHMARKS), help="which benchmark (see above)")
    p.add_argument("--optim-steps", type=int, default=100,
                   help="optim, sweep, dist, mtp, arch, precision, collider, loader: training steps per run")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="mtp: tokens decoded per sample prompt; decode: tokens decoded per variant; "
                        "batched: tokens per completion")
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

    p = sub.add_parser("eval", help="compiler-verified evaluation (HumanEval-Rust pass@k), val bits per byte",
                       description="humaneval-rust: generate completions with a trained model (--run), read "
                                   "them (--completions) or take the problems' canonical solutions (neither), "
                                   "compile and run each in the rustc sandbox, and report pass@k, compile rate, "
                                   "semantic correctness and rustc error codes. bpb: the val loss and bits per "
                                   "byte of --run on the held-out crates, as the trainer measures them, for any "
                                   "stage (pretrained, SFT, RL).")
    p.add_argument("what", choices=["humaneval-rust", "bpb"])
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
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's p when sampling (1 = off)")
    p.add_argument("--generate-only", action="store_true",
                   help="with --run: write the completions (and how they were sampled) to --out and score nothing, "
                        "for a machine without rustc; score them elsewhere with --completions")
    p.add_argument("--batch-size", type=int, default=None,
                   help="completions generated together (default 8; 1 = one at a time; a looped model with Q-exit "
                        "decodes one at a time); bpb: sequences per batch (default: the run's train.batch_size)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="bpb: the prepared-data folder whose held-out crates to measure (default: the run's own data)")
    p.add_argument("--batches", type=int, default=0,
                   help="bpb: held-out batches of the run's batch size (default: its eval.val_batches)")
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
