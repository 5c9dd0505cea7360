"""Prepared-data folders: the tokenizer, the token shards and a manifest, to train on another machine.

`ternchat data --export DIR` copies what training reads (tokenizer, shard files and their index,
the corpus's compile tags when `data verify` made them) into one folder, with `manifest.json`:
format, vocabulary, token and document counts per split, the SHA-256 of every file, the corpus
summary and its provenance (Debian releases, packages and versions, crates). `--max-train-tokens N`
keeps about the first N train tokens, ending at a document boundary (val is always whole, so val bpb stays
comparable). What SFT reads comes along too: the corpus's mined functions (`ternchat data functions`;
`--max-functions N` keeps a seeded sample) and the training tasks file, so that `ternchat sft` of a run
trained from the folder needs neither the corpus nor rustc. `ternchat train --data DIR`
(`data.prepared`) trains from the folder alone: no sources, no apt, no network. Opening a folder checks
every file against the manifest, and refuses one whose vocabulary or format differs from what the
config and this ternchat expect.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ternchat.data import shards as shards_mod
from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.paths import building, file_sha256

FORMAT = "ternchat-prepared-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TAGS_FILE = "compile_tags.jsonl"
FUNCTIONS_FILE = "functions.jsonl"  # the corpus's documented functions, mined for SFT (verify/function_data.py)
TASKS_FILE = "train_tasks.jsonl"  # the sandbox-checked training tasks (verify/tasks.py)


def _take_train_shards(shard_dir: Path, tok: Tokenizer, out: Path, max_tokens: int) -> list[dict]:
    """Copy the train shards into `out`; with `max_tokens`, stop at the end of the last document that
    ends within the first `max_tokens` tokens (or, when none does, of the document under way there)."""
    entries = []
    taken = 0
    for entry in _index(shard_dir)["splits"]["train"]:
        if not max_tokens or taken + entry["tokens"] < max_tokens:
            shutil.copyfile(shard_dir / entry["file"], out / entry["file"])
            entries.append(entry)
            taken += entry["tokens"]
            continue
        tokens = np.asarray(shards_mod.open_shard(shard_dir / entry["file"], tok.hash).tokens)
        ends = np.flatnonzero(tokens == tok.eod_id)
        inside = ends[ends < max_tokens - taken]
        if not len(ends):  # one document longer than the whole shard: it goes on into the next
            shutil.copyfile(shard_dir / entry["file"], out / entry["file"])
            entries.append(entry)
            taken += entry["tokens"]
            continue
        tokens = np.array(tokens[:(inside[-1] if len(inside) else ends[0]) + 1])
        docs = int(np.count_nonzero(tokens == tok.bos_id))
        sha = shards_mod.write_shard(out / entry["file"], tokens, docs, tok.hash)
        entries.append({"file": entry["file"], "tokens": int(len(tokens)), "documents": docs, "sha256": sha})
        break
    return entries


def _index(shard_dir: Path) -> dict:
    return json.loads((shard_dir / shards_mod.INDEX_FILE).read_text())


def _copy_split(shard_dir: Path, out: Path, split: str) -> list[dict]:
    entries = _index(shard_dir)["splits"][split]
    for entry in entries:
        shutil.copyfile(shard_dir / entry["file"], out / entry["file"])
    return entries


def _copy_tags(corpus_dir: Path, out: Path, train_docs: int) -> bool:
    """The corpus's compile tags for the exported documents (train ones past a cap are left out)."""
    source = corpus_dir / TAGS_FILE
    if not source.exists():
        return False
    seen = 0
    with open(source, encoding="utf-8") as f, open(out / TAGS_FILE, "w", encoding="utf-8") as g:
        for line in f:
            if json.loads(line)["split"] == "train":
                seen += 1
                if seen > train_docs:
                    continue
            g.write(line)
    return True


def _copy_sample(source: Path, dest: Path, limit: int, seed: int = 0) -> int:
    """A seeded sample of `limit` lines of `source` (every line when `limit` is 0), in their order; the count."""
    with open(source, encoding="utf-8") as f:
        lines = f.readlines()
    if limit and limit < len(lines):
        keep = sorted(random.Random(seed).sample(range(len(lines)), limit))
        lines = [lines[i] for i in keep]
    dest.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def provenance(summary: dict, corpus_dir: Path) -> dict:
    """Where the corpus came from: Debian releases and packages (from the unpacked package folders'
    names), and every crate with its versions and origins (from the corpus manifest)."""
    from ternchat.data.debian import package_of_root

    packages = [p for p in (package_of_root(Path(s["root"])) for s in summary.get("sources", [])) if p]
    crates: dict[str, dict[str, set]] = defaultdict(lambda: {"versions": set(), "origins": set()})
    manifest = corpus_dir / "manifest.jsonl"
    if manifest.exists():
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                crates[row["crate"]]["versions"].add(row["version"])
                crates[row["crate"]]["origins"].add(row["origin"])
    return {
        "origins": sorted({s["origin"] for s in summary.get("sources", [])}),
        "debian_releases": sorted({p["release"] for p in packages}),
        "debian_packages": sorted(packages, key=lambda p: (p["release"], p["package"])),
        "crates": {name: {k: sorted(v) for k, v in c.items()} for name, c in sorted(crates.items())},
    }


def _provenance_of(corpus_dir: Path, summary: dict) -> dict:
    """A corpus's provenance; re-exporting a prepared folder (a smaller subset) keeps the folder's."""
    earlier = corpus_dir / MANIFEST
    if earlier.exists():
        return json.loads(earlier.read_text())["provenance"]
    return provenance(summary, corpus_dir)


def export_prepared(out: Path, *, corpus_dir: Path, corpus_summary: dict, tokenizer: Tokenizer, shard_dir: Path,
                    max_train_tokens: int = 0, max_functions: int = 0, tasks_file: Path | None = None) -> dict:
    """Write the prepared-data folder `out` (see the module docstring); return its manifest. The corpus's
    mined functions come along when it has them, and `tasks_file` when given."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    with building(out) as tmp:
        tokenizer.save(tmp / TOKENIZER_DIR)
        splits = {"train": _take_train_shards(shard_dir, tokenizer, tmp, max_train_tokens),
                  "val": _copy_split(shard_dir, tmp, "val")}
        shards_mod.write_index(tmp, tokenizer.hash, splits)
        train_docs = sum(e["documents"] for e in splits["train"])
        has_tags = _copy_tags(corpus_dir, tmp, train_docs)
        functions = corpus_dir / FUNCTIONS_FILE
        sft = {"functions": _copy_sample(functions, tmp / FUNCTIONS_FILE, max_functions) if functions.exists() else 0,
               "tasks": _copy_sample(Path(tasks_file), tmp / TASKS_FILE, 0) if tasks_file else 0}
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "shard_format": shards_mod.FORMAT_VERSION,
            "vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash,
            "tokens": {s: sum(e["tokens"] for e in entries) for s, entries in splits.items()},
            "documents": {s: sum(e["documents"] for e in entries) for s, entries in splits.items()},
            "max_train_tokens": max_train_tokens, "compile_tags": has_tags, "sft": sft,
            "files": {p.relative_to(tmp).as_posix(): file_sha256(p) for p in files},
            "corpus": corpus_summary, "provenance": _provenance_of(corpus_dir, corpus_summary),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class PreparedData:
    folder: Path
    manifest: dict
    tokenizer: Tokenizer

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / TOKENIZER_DIR


def open_prepared(folder: Path, vocab_size: int) -> PreparedData:
    """Open and check a prepared-data folder for a config whose tokenizer has `vocab_size` tokens."""
    folder = Path(folder).expanduser().resolve()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.prepared = {folder}: no readable {MANIFEST} ({e}); make the folder with "
                        "`ternchat data --export DIR`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{folder} is format {manifest.get('format')!r} version {manifest.get('format_version')}; "
                        f"this ternchat reads {FORMAT!r} version {FORMAT_VERSION}. Export it again.")
    if manifest["shard_format"] != shards_mod.FORMAT_VERSION:
        raise DataError(f"{folder} holds shards of format {manifest['shard_format']}; this ternchat reads format "
                        f"{shards_mod.FORMAT_VERSION}. Export it again with this version.")
    if manifest["vocab_size"] != vocab_size:
        raise DataError(f"{folder} was tokenized with vocab {manifest['vocab_size']}, but the config has "
                        f"tokenizer.vocab_size = {vocab_size}; set tokenizer.vocab_size = {manifest['vocab_size']} "
                        "or export a folder with that vocabulary")
    for name, sha in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if file_sha256(path) != sha:
            raise DataError(f"{folder}: {name} does not match its SHA-256 in {MANIFEST} (corrupt or changed); "
                            "copy or export the folder again")
    tokenizer = Tokenizer.load(folder / TOKENIZER_DIR)
    if tokenizer.hash != manifest["tokenizer_hash"]:
        raise DataError(f"{folder}: the tokenizer's hash {tokenizer.hash[:16]} is not the manifest's "
                        f"{manifest['tokenizer_hash'][:16]}")
    return PreparedData(folder, manifest, tokenizer)


def describe(manifest: dict) -> str:
    tokens, docs = manifest["tokens"], manifest["documents"]
    releases = ", ".join(manifest["provenance"]["debian_releases"]) or "none"
    return (f"prepared data: vocab {manifest['vocab_size']}, train {tokens['train']:,} tokens in {docs['train']:,} "
            f"documents, val {tokens['val']:,} tokens in {docs['val']:,} documents; "
            f"{len(manifest['provenance']['crates'])} crates, Debian releases: {releases}")


def folder_size(folder: Path) -> int:
    return sum(os.path.getsize(p) for p in Path(folder).rglob("*") if p.is_file())


def export_artifacts(art, out: Path, max_train_tokens: int = 0, max_functions: int = 0,
                     tasks_file: Path | None = None, log=print) -> dict:
    """`ternchat data --export DIR`: the prepared-data folder of the pipeline's artifacts `art`."""
    manifest = export_prepared(out, corpus_dir=art.corpus_dir, corpus_summary=art.corpus_summary,
                               tokenizer=art.tokenizer, shard_dir=art.shard_dir, max_train_tokens=max_train_tokens,
                               max_functions=max_functions, tasks_file=tasks_file)
    sft = manifest["sft"]
    log(f"{describe(manifest)}\nfor SFT: {sft['functions']:,} mined functions"
        + ("" if sft["functions"] else " (mine them first with `ternchat data functions`)")
        + f", {sft['tasks']} training tasks" + ("" if sft["tasks"] else " (build them with `ternchat tasks`)")
        + f"\nexported to {out} ({folder_size(out) / 1e6:,.1f} MB); train from it with `ternchat train --data {out}`")
    return manifest
