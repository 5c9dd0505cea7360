"""Compiler-checked data: tag each corpus file by what rustc says about it, cached by content hash.

Tags: `compiles` (type-checks alone as a library crate, `--emit=metadata`), `parses` (a valid
parse, but it needs its crate: modules, `crate::` paths, dependencies), `syntax_error` (does not
parse), or `unchecked` (timeout or sandbox failure). Results are kept in `$TERNCHAT_HOME/verify/
tags.jsonl` keyed by SHA-256 of the text, so a file is checked once whatever corpus it is in; the
tags of a corpus are written beside it as `compile_tags.jsonl` (crate, path, sha256, tag, codes)
for training to filter or weight by.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ternchat.verify.sandbox import check_metadata, check_parse

TAGS = ("compiles", "parses", "syntax_error", "unchecked")


def tag_source(source: str) -> dict:
    full = check_metadata(source)
    if full.outcome == "ok":
        return {"tag": "compiles", "codes": []}
    if full.outcome != "compile_error":
        return {"tag": "unchecked", "codes": []}
    parsed = check_parse(source)
    if parsed.outcome == "ok":
        return {"tag": "parses", "codes": full.error_codes}
    return {"tag": "syntax_error" if parsed.outcome == "compile_error" else "unchecked", "codes": parsed.error_codes}


def _load_cache(path: Path) -> dict[str, dict]:
    cache = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cache[row["sha256"]] = {"tag": row["tag"], "codes": row["codes"]}
    return cache


def verify_corpus(corpus_dir: Path, cache_dir: Path, limit: int = 0, workers: int = 2) -> dict:
    """Tag the corpus's files (the first `limit` of each split if > 0); return counts per tag."""
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
                docs.append((split, doc["crate"], doc["path"], doc["text"],
                             hashlib.sha256(doc["text"].encode("utf-8")).hexdigest()))
    todo = sorted({(sha, text) for _, _, _, text, sha in docs if sha not in cache})
    with ThreadPoolExecutor(max_workers=workers) as pool, open(cache_path, "a", encoding="utf-8") as out:
        for (sha, _), result in tqdm(zip(todo, pool.map(lambda item: tag_source(item[1]), todo)), total=len(todo),
                                     desc="rustc check", unit="file"):
            cache[sha] = result
            out.write(json.dumps({"sha256": sha, **result}) + "\n")
    counts = {tag: 0 for tag in TAGS}
    with open(corpus_dir / "compile_tags.jsonl", "w", encoding="utf-8") as f:
        for split, crate, path, _, sha in docs:
            result = cache[sha]
            counts[result["tag"]] += 1
            f.write(json.dumps({"split": split, "crate": crate, "path": path, "sha256": sha, **result}) + "\n")
    return {"files": len(docs), "checked_now": len(todo), **counts}
