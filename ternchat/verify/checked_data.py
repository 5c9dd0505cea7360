"""Compiler-checked data: tag each corpus file by what rustc says about it, cached by content hash.

Each file is checked with its crate's edition (Cargo's default, 2015, where `Cargo.toml` names
none). Tags: `compiles` (type-checks alone as a library crate, `--emit=metadata`), `parses` (a
valid parse, but it needs its crate: modules, `crate::` paths, dependencies), `syntax_error` (does
not parse), or `unchecked` (timeout or sandbox failure). A document whose source asserts its
outcome (rustc's UI tests: `compiles` or `fails`, see data/rustc_src.py) keeps that tag and is not
checked. Results are kept in `$TERNCHAT_HOME/verify/tags.jsonl` keyed by SHA-256 of the text and
the edition, so a file is checked once whatever corpus it is in; the tags of a corpus are written
beside it as `compile_tags.jsonl` (crate, path, edition, sha256, tag, codes) for training to filter
or weight by.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ternchat.verify.sandbox import Limits, check_metadata, check_parse

TAGS = ("compiles", "parses", "syntax_error", "fails", "unchecked")


def tag_source(source: str, edition: str = "2021", limits: Limits = Limits()) -> dict:
    full = check_metadata(source, edition, limits)
    if full.outcome == "ok":
        return {"tag": "compiles", "codes": []}
    if full.outcome != "compile_error":
        return {"tag": "unchecked", "codes": []}
    parsed = check_parse(source, edition, limits)
    if parsed.outcome == "ok":
        return {"tag": "parses", "codes": full.error_codes}
    return {"tag": "syntax_error" if parsed.outcome == "compile_error" else "unchecked", "codes": parsed.error_codes}


def _load_cache(path: Path) -> dict[str, dict]:
    cache = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                cache[(row["sha256"], row["edition"])] = {"tag": row["tag"], "codes": row["codes"]}
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line or an older format: that file is simply checked again
    return cache


def verify_corpus(corpus_dir: Path, cache_dir: Path, limit: int = 0, workers: int = 0,
                  limits: Limits = Limits()) -> dict:
    """Tag the corpus's files (the first `limit` of each split if > 0) on `workers` threads, each running
    rustc in its sandbox (0 = one per core); return the files and bytes per tag."""
    workers = workers or os.cpu_count() or 1
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = cache_dir / "tags.jsonl"
    cache = _load_cache(cache_path)
    docs = []
    for split in ("train", "val"):
        with open(corpus_dir / f"{split}.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit and i >= limit:
                    break
                doc = json.loads(line)
                key = (hashlib.sha256(doc["text"].encode("utf-8")).hexdigest(), doc.get("edition", "2021"))
                docs.append((split, doc["crate"], doc["path"], doc["text"], key, doc.get("expect")))
    todo = sorted({(key, text) for _, _, _, text, key, expect in docs if key not in cache and not expect})
    with ThreadPoolExecutor(max_workers=workers) as pool, open(cache_path, "a", encoding="utf-8") as out:
        results = pool.map(lambda item: tag_source(item[1], item[0][1], limits), todo)
        for ((sha, edition), _), result in tqdm(zip(todo, results), total=len(todo), desc="rustc check", unit="file"):
            cache[(sha, edition)] = result
            out.write(json.dumps({"sha256": sha, "edition": edition, **result}) + "\n")
    counts = {tag: 0 for tag in TAGS}
    tag_bytes = {tag: 0 for tag in TAGS}
    with open(corpus_dir / "compile_tags.jsonl", "w", encoding="utf-8") as f:
        for split, crate, path, text, (sha, edition), expect in docs:
            result = {"tag": expect, "codes": []} if expect else cache[(sha, edition)]
            counts[result["tag"]] += 1
            tag_bytes[result["tag"]] += len(text.encode("utf-8"))
            f.write(json.dumps({"split": split, "crate": crate, "path": path, "edition": edition, "sha256": sha,
                                **result}) + "\n")
    return {"files": len(docs), "checked_now": len(todo), **counts, "bytes": tag_bytes}


def verify_configured_corpus(cfg, limit: int = 0, force: bool = False, allow_unisolated: bool = False,
                             log=print) -> dict:
    """`ternchat data verify`: build (or find) the config's corpus and tag its files; the counts per tag."""
    from ternchat.data.pipeline import prepare_data
    from ternchat.paths import ternchat_home
    from ternchat.verify.sandbox import checked_isolation

    limits = Limits(allow_unisolated=allow_unisolated or cfg.eval.allow_unisolated)
    checked_isolation(limits)
    corpus_dir = prepare_data(cfg, until="corpus", force=force).corpus_dir
    start = time.perf_counter()
    counts = verify_corpus(corpus_dir, ternchat_home() / "verify", limit, cfg.data.workers, limits=limits)
    total = sum(counts["bytes"].values()) or 1
    log(f"compile tags of {counts['files']} files ({counts['checked_now']} checked now in "
        f"{time.perf_counter() - start:.0f} s): "
        + ", ".join(f"{tag} {counts[tag]} ({100 * counts['bytes'][tag] / total:.1f}% of bytes)" for tag in TAGS)
        + f" -> {corpus_dir / 'compile_tags.jsonl'}")
    return counts
