"""`ternchat data`: corpus -> tokenizer -> shards, each cached under `$TERNCHAT_HOME` by input hash.

Every step's output folder is named by a hash of everything it depends on (for the corpus: the
cleaning settings and the path, size and mtime of every source file; for the tokenizer: the
corpus and vocabulary settings; for the shards: the tokenizer's content hash, the corpus and the
shard size). A step whose folder is complete is skipped, so re-running is cheap and a changed
input rebuilds only what depends on it. Folders are written under a temporary name and renamed
when complete, so an interrupted step leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from ternchat.config import Config
from ternchat.data import corpus as corpus_mod
from ternchat.data import shards as shards_mod
from ternchat.data.debian import (RUST_SRC_PACKAGE, SYSTEM_APT, fetch_debian_crates, release_apt,
                                  resolve_package_list, system_release)
from ternchat.data.discover import local_rust_roots
from ternchat.data.errors import DataError
from ternchat.data.rustc_src import fetch_rustc_source
from ternchat.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, evaluate
from ternchat.paths import building, ternchat_home

STEPS = ("corpus", "tokenizer", "shards")
CORPUS_FORMAT = 5  # bump when cleaning or the corpus layout changes what a step produces
Log = Callable[[str], None]


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class DataArtifacts:
    corpus_dir: Path
    corpus_summary: dict
    tokenizer_dir: Path | None = None
    tokenizer: Tokenizer | None = None
    shard_dir: Path | None = None


def resolve_roots(cfg: Config, home: Path) -> list[tuple[Path, str]]:
    """The source folders the config asks for, fetching Debian crates or a HF dataset if needed."""
    data = cfg.data
    roots: list[tuple[Path, str]] = []
    for source in data.sources:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise DataError(f"--source {source}: no such directory")
        roots.append((path, "source"))
    if data.auto_discover:
        roots += local_rust_roots()
    if data.debian:
        sources = [release_apt(r, home / "debian", data.debian_mirror) for r in data.debian_releases] or [SYSTEM_APT]
        for apt in sources:
            packages = resolve_package_list(data.debian_crates, apt)
            found = fetch_debian_crates(packages, apt.cache_dir(home / "debian"), workers=data.workers, apt=apt)
            roots += [(root, apt.origin) for root in found]
    if data.rustc_src:
        release = data.debian_releases[-1] if data.debian_releases else system_release()
        roots += fetch_rustc_source(release_apt(release, home / "debian", data.debian_mirror), home / "rustc" / release)
    if data.rust_src:
        roots += [(root, "rust-src") for root in fetch_debian_crates([RUST_SRC_PACKAGE], home / "debian")]
    if data.hf_dataset:
        from ternchat.data.hf import materialize_hf_dataset
        roots.append((materialize_hf_dataset(data.hf_dataset, data.hf_max_files, home / "hf"), "hf"))
    if not roots:
        raise DataError("no Rust sources: auto-discovery found none on this machine and none were given. "
                        "Use --debian (Debian/Ubuntu), --source DIR, or --hf DATASET.")
    return roots


def _corpus_key(cfg: Config, files: list) -> str:
    d = cfg.data
    settings = [d.min_file_bytes, d.max_file_bytes, d.max_line_chars, d.near_dup_threshold, d.minhash_perms,
                d.val_fraction, d.seed, CORPUS_FORMAT]
    if d.debian and d.debian_crates == "all":
        settings.append("val crates pinned")  # corpus.choose_val_crates
    listing = hashlib.sha256()
    for f in files:
        st = os.stat(f.abspath)
        listing.update(f"{f.abspath}\0{f.crate}\0{f.version}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return _hash(settings, listing.hexdigest())


def prepare_corpus(cfg: Config, home: Path, force: bool, log: Log) -> tuple[Path, dict, str]:
    roots = resolve_roots(cfg, home)
    files = corpus_mod.discover_files(roots)
    key = _corpus_key(cfg, files)
    out = home / "corpus" / key[:16]
    if not force and (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        log(f"corpus: up to date in {out}")
    else:
        log(f"corpus: {len(files)} .rs files under {len(roots)} source folder(s)")
        summary = corpus_mod.build_corpus(cfg.data, files, roots, out)
    log(corpus_mod.format_summary(summary))
    return out, summary, key


def _training_texts(corpus_dir: Path, max_bytes: int) -> Iterator[str]:
    taken = 0
    for text in corpus_mod.iter_documents(corpus_dir, "train"):
        if max_bytes and taken >= max_bytes:
            return
        taken += len(text)
        yield text


def prepare_tokenizer(cfg: Config, home: Path, corpus_dir: Path, corpus_key: str, force: bool,
                      log: Log) -> tuple[Path, Tokenizer]:
    t = cfg.tokenizer
    key = _hash(corpus_key, t.vocab_size, t.max_train_bytes, SPLIT_PATTERN, SPECIAL_TOKENS)
    out = home / "tokenizer" / key[:16]
    if not force and (out / "build.json").exists():
        tok = Tokenizer.load(out)
        log(f"tokenizer: up to date in {out} (vocab {tok.vocab_size}, hash {tok.hash[:12]})")
        return out, tok
    log(f"tokenizer: training byte-level BPE, vocab {t.vocab_size}, on the train split ...")
    start = time.perf_counter()
    train_files = json.loads((corpus_dir / "summary.json").read_text())["splits"]["train"]["files"]
    texts = tqdm(_training_texts(corpus_dir, t.max_train_bytes), total=train_files, desc="tokenizer", unit="doc")
    tok = Tokenizer.train(texts, t.vocab_size)
    seconds = time.perf_counter() - start
    with building(out) as tmp:
        tok.save(tmp)
        (tmp / "build.json").write_text(json.dumps({"corpus": str(corpus_dir), "vocab_size": tok.vocab_size,
                                                     "train_seconds": seconds, "hash": tok.hash}, indent=1))
    log(f"tokenizer: trained in {seconds:.1f}s -> {out} (hash {tok.hash[:12]})")
    return out, tok


def tokenizer_report(tok: Tokenizer, tok_dir: Path, corpus_dir: Path, threads: int, log: Log) -> dict:
    """Bytes per token and encode speed on the val split; saved as eval.json beside the tokenizer."""
    texts = list(corpus_mod.iter_documents(corpus_dir, "val"))
    report = evaluate(tok, texts, threads)
    (tok_dir / "eval.json").write_text(json.dumps(report, indent=1))
    log(f"tokenizer eval on val ({report['documents']} files, {report['bytes'] / 1e6:.1f} MB): "
        f"{report['bytes_per_token']:.3f} bytes/token, encode {report['encode_mb_s_1thread']:.1f} MB/s "
        f"on 1 thread, {report['encode_mb_s_batch']:.1f} MB/s batched on {report['threads']} threads")
    return report


def prepare_shards(cfg: Config, home: Path, corpus_dir: Path, corpus_key: str, tok: Tokenizer, force: bool,
                   log: Log) -> Path:
    key = _hash(corpus_key, tok.hash, cfg.data.shard_tokens, shards_mod.FORMAT_VERSION)
    out = home / "shards" / key[:16]
    if not force and (out / shards_mod.INDEX_FILE).exists():
        log(f"shards: up to date in {out}")
        return out
    summary = json.loads((corpus_dir / "summary.json").read_text())
    threads = corpus_mod.worker_count(cfg.data.workers)
    splits = {}
    with building(out) as tmp:
        for split in corpus_mod.SPLITS:
            splits[split] = shards_mod.write_split(
                corpus_mod.iter_documents(corpus_dir, split), tok, tmp, split, cfg.data.shard_tokens,
                threads=threads, total=summary["splits"][split]["files"])
        shards_mod.write_index(tmp, tok.hash, splits)
    counts = {s: sum(e["tokens"] for e in entries) for s, entries in splits.items()}
    log(f"shards: train {counts['train']:,} tokens in {len(splits['train'])} file(s), "
        f"val {counts['val']:,} tokens in {len(splits['val'])} file(s) -> {out}")
    return out


def _open_prepared(cfg: Config, until: str, log: Log) -> DataArtifacts:
    """A prepared-data folder stands in for all three steps: it holds the tokenizer and shards, and
    its compile tags where the corpus's are (`corpus_dir`); it has no corpus documents."""
    from ternchat.data.prepared import describe, open_prepared

    if until == "corpus":
        raise DataError(f"data.prepared = {cfg.data.prepared} holds token shards, not the corpus's documents "
                        "that this command reads; run it where the corpus was built, or unset data.prepared")
    prepared = open_prepared(Path(cfg.data.prepared), cfg.tokenizer.vocab_size)
    log(f"{describe(prepared.manifest)} (from {prepared.folder})")
    return DataArtifacts(corpus_dir=prepared.folder, corpus_summary=prepared.manifest["corpus"],
                         tokenizer_dir=prepared.tokenizer_dir, tokenizer=prepared.tokenizer,
                         shard_dir=prepared.folder)


def prepare_data(cfg: Config, until: str = "shards", force: bool = False, eval_tokenizer: bool = False,
                 log: Log = print) -> DataArtifacts:
    """Run the data steps up to and including `until`, skipping the ones whose inputs did not change
    (`force` rebuilds them all)."""
    if until not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {until!r}")
    if cfg.data.prepared:
        return _open_prepared(cfg, until, log)
    home = ternchat_home()
    corpus_dir, summary, corpus_key = prepare_corpus(cfg, home, force, log)
    art = DataArtifacts(corpus_dir, summary)
    if until == "corpus":
        return art
    art.tokenizer_dir, art.tokenizer = prepare_tokenizer(cfg, home, corpus_dir, corpus_key, force, log)
    if eval_tokenizer:
        tokenizer_report(art.tokenizer, art.tokenizer_dir, corpus_dir, cfg.data.workers, log)
    if until == "tokenizer":
        return art
    art.shard_dir = prepare_shards(cfg, home, corpus_dir, corpus_key, art.tokenizer, force, log)
    return art
