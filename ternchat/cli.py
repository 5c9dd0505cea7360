"""The `ternchat` command: parse arguments, load the config, call one function per subcommand.

Exit status: 0 on success, 2 for a bad config or bad arguments (nothing is written), 1 for a
failure of the work itself (missing tools, corrupt data), each with one clear message.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ternchat import __version__
from ternchat.config import SECTIONS, Config, ConfigError, describe, load_config
from ternchat.data.errors import DataError


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
    if args.crates_file:
        extra.append(f"data.debian_crates={json.dumps(args.crates_file)}")
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
    art = prepare_data(cfg, until=args.step, force=args.force, eval_tokenizer=args.eval)
    print(f"data ready: corpus {art.corpus_dir}"
          + (f", tokenizer {art.tokenizer_dir}" if art.tokenizer_dir else "")
          + (f", shards {art.shard_dir}" if art.shard_dir else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ternchat", description="Train, evaluate and run small ternary-weight language models for Rust code.")
    parser.add_argument("--version", action="version", version=f"ternchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", help="build the Rust corpus, tokenizer and token shards (cached)",
                       description="Run the data pipeline up to STEP (default: all of it). Steps whose "
                                   "inputs did not change are skipped. Data lives under $TERNCHAT_HOME "
                                   "(default ~/.cache/ternchat).")
    p.add_argument("step", nargs="?", default="shards", choices=["corpus", "tokenizer", "shards"],
                   help="last step to run: corpus, tokenizer or shards (default: shards, i.e. everything)")
    _add_config_args(p)
    p.add_argument("--source", action="append", metavar="DIR", default=[],
                   help="a directory of Rust sources to add (repeatable)")
    p.add_argument("--debian", action="store_true",
                   help="download ~150 curated crates from Debian's librust-*-dev packages (~100 MB)")
    p.add_argument("--crates-file", metavar="FILE", help="with --debian: a file of package names to use instead")
    p.add_argument("--no-auto", action="store_true",
                   help="do not scan this machine's Rust sources (Debian registry, rust-src, ~/.cargo)")
    p.add_argument("--hf", metavar="DATASET", help="add Rust files from a Hugging Face dataset ('hf' extra)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="tokenizer vocabulary size")
    p.add_argument("--eval", action="store_true", help="report tokenizer bytes/token on val and encode MB/s")
    p.add_argument("--force", action="store_true", help="rebuild the steps even if their inputs are unchanged")
    p.set_defaults(func=cmd_data)

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
    except DataError as e:
        print(f"ternchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ternchat: interrupted; completed steps are kept and the next run resumes from them",
              file=sys.stderr)
        return 130
