"""Build the Rust corpus: discover files, clean, deduplicate, split train/val by crate, write it.

Output directory (written to a temporary name and renamed when complete):
`train.jsonl`, `val.jsonl` (one document a line: crate, path, edition, text, and `expect` where the source
asserts its compile tag), `manifest.jsonl` (provenance of every kept file: crate, version, path, origin,
sha256, bytes, license, split), `summary.json` (counts, bytes, files dropped by reason, duplicates
removed, val crates) and, when some documents assert their tag (rustc's UI tests), `compile_tags.jsonl`
with those tags (the others `unchecked` until `ternchat data verify`).

The split is by crate *name*, so two versions of one crate, or its copies from two Debian releases,
never straddle train and val. Rust's own sources (`rustc:` crates) are never in val. A corpus of every
Debian crate (`data.debian_crates = "all"`) keeps the val crates that split chose for the whole of
Debian 12 (`debian_val_crates.txt`), whichever releases it takes, so its val bpb stays comparable
across corpora; any other corpus draws its val crates with `data.seed` until they hold
`data.val_fraction` of the bytes that may be val.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from functools import partial
from importlib import resources
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from ternchat.config import DataConfig
from ternchat.data import rustc_src
from ternchat.data.clean import CleanRules, NearDuplicateIndex, check_file
from ternchat.data.debian import parse_crate_list
from ternchat.data.discover import SourceFile, scan_root
from ternchat.data.errors import DataError
from ternchat.paths import building

SPLITS = ("train", "val")


def worker_count(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def split_crates(bytes_by_crate: dict[str, int], val_fraction: float, seed: int) -> set[str]:
    """Pick whole crates for val, in a seeded order, until they hold `val_fraction` of the bytes.

    A crate that would push val past twice the target is passed over, so one huge crate does not
    swell val; if only such crates are left, the smallest ones complete the target. At least one
    crate always stays in train.
    """
    if len(bytes_by_crate) < 2:
        raise DataError(f"the corpus has {len(bytes_by_crate)} crate(s); a train/val split by crate needs "
                        "at least 2. Add sources (--source DIR, --debian).")
    target = val_fraction * sum(bytes_by_crate.values())
    order = sorted(bytes_by_crate, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    val: set[str] = set()
    val_bytes = 0
    for crate in order:
        if val_bytes >= target:
            break
        if val_bytes + bytes_by_crate[crate] <= 2 * target:
            val.add(crate)
            val_bytes += bytes_by_crate[crate]
    for crate in sorted((c for c in order if c not in val), key=lambda c: bytes_by_crate[c]):
        if val_bytes >= target or len(val) == len(order) - 1:
            break
        val.add(crate)
        val_bytes += bytes_by_crate[crate]
    return val


def pinned_val_crates() -> set[str]:
    """The val crates of the whole-Debian corpus (shipped with ternchat)."""
    text = resources.files("ternchat.data").joinpath("debian_val_crates.txt").read_text(encoding="utf-8")
    return set(parse_crate_list(text))


def choose_val_crates(data: DataConfig, bytes_by_crate: dict[str, int]) -> set[str]:
    """The val crates of a corpus (see the module docstring)."""
    eligible = {c: n for c, n in bytes_by_crate.items() if not c.startswith(rustc_src.CRATE_PREFIX)}
    if data.debian and data.debian_crates == "all":
        pinned = pinned_val_crates() & eligible.keys()
        if pinned:
            return pinned
    if len(eligible) < len(bytes_by_crate) and len(eligible) < 2:
        raise DataError("Rust's own sources (--rustc-src) are never in val: add crates (--debian, --source DIR) "
                        "for a train/val split")
    return split_crates(eligible, data.val_fraction, data.seed)


def version_key(version: str) -> tuple[tuple[int, ...], int]:
    """Semver order: numeric core, then a release above its pre-releases ("1.0.0-rc1" < "1.0.0")."""
    core, _, pre = version.partition("+")[0].partition("-")
    return tuple(int(p) if p.isdigit() else -1 for p in core.split(".")), 0 if pre else 1


def discover_files(roots: list[tuple[Path, str]]) -> list[SourceFile]:
    """Every `.rs` file under `roots`, in a stable order: by crate, newest version first, then path.
    Deduplication keeps the first of equal or near-equal files, so a crate shipped in several
    versions (`nom` 7 and `nom` 4) keeps its newest copy."""
    files: list[SourceFile] = []
    for root, origin in roots:
        files += rustc_src.scan(root, origin) if origin in rustc_src.ORIGINS else scan_root(root, origin)
    files.sort(key=lambda f: (f.path, f.origin))  # stable sorts: crate, then version descending, then these
    files.sort(key=lambda f: version_key(f.version), reverse=True)
    files.sort(key=lambda f: f.crate)
    return files


def build_corpus(data: DataConfig, files: list[SourceFile], roots: list[tuple[Path, str]], out: Path) -> dict:
    """Clean, deduplicate and split `files` (found under `roots`) into `out`; return the summary."""
    if not files:
        listed = ", ".join(str(r) for r, _ in roots) or "(none)"
        raise DataError(f"no .rs files found in the sources: {listed}. Give --source DIR or --debian.")

    rules = CleanRules(data.min_file_bytes, data.max_file_bytes, data.max_line_chars, data.minhash_perms)
    dropped: Counter[str] = Counter()
    first_by_sha: dict[str, str] = {}
    near = NearDuplicateIndex(data.near_dup_threshold, data.minhash_perms)
    bytes_by_crate: dict[str, int] = defaultdict(int)
    workers = worker_count(data.workers)
    check = partial(check_file, rules=rules)
    paths = [f.abspath for f in files]
    with building(out) as tmp:
        # Kept texts go to a spool file, not memory, so memory stays flat as the corpus grows.
        spool = tmp / "kept.jsonl.tmp"
        with Pool(workers) as pool, open(spool, "w", encoding="utf-8") as spool_f:
            results = pool.imap(check, paths, chunksize=16) if workers > 1 else map(check, paths)
            for index, (src, res) in enumerate(tqdm(zip(files, results), total=len(files), desc="clean+dedup",
                                                    unit="file")):
                if res.reason:
                    dropped[res.reason] += 1
                    continue
                key = f"{src.crate}/{src.version}/{src.path}@{src.origin}"
                if res.sha256 in first_by_sha:
                    dropped["exact_duplicate"] += 1
                    continue
                first_by_sha[res.sha256] = key
                if near.add_or_match(key, res.minhash) is not None:
                    dropped["near_duplicate"] += 1
                    continue
                bytes_by_crate[src.crate] += len(res.text.encode("utf-8"))
                spool_f.write(json.dumps({"file": index, "sha256": res.sha256, "text": res.text}) + "\n")
        if not bytes_by_crate:
            raise DataError(f"all {len(files)} files were dropped by cleaning ({dict(dropped)})")
        val_crates = choose_val_crates(data, bytes_by_crate)
        summary = _write_corpus(_read_spool(spool, files), val_crates, tmp)
        spool.unlink()
        summary.update(files_found=len(files), crates=len(bytes_by_crate), dropped=dict(sorted(dropped.items())),
                       exact_duplicates=dropped.get("exact_duplicate", 0),
                       near_duplicates=dropped.get("near_duplicate", 0),
                       sources=[{"root": str(root), "origin": origin} for root, origin in roots])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _read_spool(spool: Path, files: list[SourceFile]) -> Iterator[tuple[SourceFile, str, str]]:
    with open(spool, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield files[row["file"]], row["text"], row["sha256"]


def _write_corpus(kept: Iterable[tuple[SourceFile, str, str]], val_crates: set[str], tmp: Path) -> dict:
    stats = {s: {"files": 0, "bytes": 0, "crates": set()} for s in SPLITS}
    tag_rows, asserted = [], 0
    with open(tmp / "train.jsonl", "w", encoding="utf-8") as train_f, \
            open(tmp / "val.jsonl", "w", encoding="utf-8") as val_f, \
            open(tmp / "manifest.jsonl", "w", encoding="utf-8") as manifest_f:
        for src, text, sha in kept:
            split = "val" if src.crate in val_crates else "train"
            nbytes = len(text.encode("utf-8"))
            doc = {"crate": src.crate, "path": src.path, "edition": src.edition, "text": text}
            if src.expect:
                doc["expect"] = src.expect
                asserted += 1
            (val_f if split == "val" else train_f).write(json.dumps(doc) + "\n")
            tag_rows.append(json.dumps({"split": split, "crate": src.crate, "path": src.path, "edition": src.edition,
                                        "sha256": sha, "tag": src.expect or "unchecked", "codes": []}) + "\n")
            manifest_f.write(json.dumps({
                "crate": src.crate, "version": src.version, "path": src.path, "origin": src.origin,
                "source_path": src.abspath, "sha256": sha, "bytes": nbytes, "license": src.license, "edition": src.edition,
                "split": split}) + "\n")
            stats[split]["files"] += 1
            stats[split]["bytes"] += nbytes
            stats[split]["crates"].add(src.crate)
    if asserted:
        (tmp / "compile_tags.jsonl").write_text("".join(tag_rows), encoding="utf-8")
    total_bytes = sum(stats[s]["bytes"] for s in SPLITS)
    return {
        "files_kept": sum(stats[s]["files"] for s in SPLITS),
        "bytes": total_bytes,
        "val_byte_fraction": stats["val"]["bytes"] / total_bytes,
        "splits": {s: {"files": stats[s]["files"], "bytes": stats[s]["bytes"],
                       "crates": sorted(stats[s]["crates"])} for s in SPLITS},
    }


def format_summary(summary: dict) -> str:
    mb = summary["bytes"] / 1e6
    split = summary["splits"]
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    return (f"corpus: {summary['crates']} crates, {summary['files_kept']} files, {mb:.1f} MB "
            f"(found {summary['files_found']} files)\n"
            f"  duplicates removed: {summary['exact_duplicates']} exact, {summary['near_duplicates']} near\n"
            f"  dropped: {dropped}\n"
            f"  train: {len(split['train']['crates'])} crates, {split['train']['files']} files, "
            f"{split['train']['bytes'] / 1e6:.1f} MB\n"
            f"  val:   {len(split['val']['crates'])} crates, {split['val']['files']} files, "
            f"{split['val']['bytes'] / 1e6:.1f} MB ({100 * summary['val_byte_fraction']:.1f}% of bytes)")


def iter_records(corpus_dir: Path, split: str) -> Iterator[dict]:
    """The documents of one split (crate, path, edition, text, maybe expect), in corpus order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def iter_documents(corpus_dir: Path, split: str) -> Iterator[str]:
    """The texts of one split, in corpus order."""
    for record in iter_records(corpus_dir, split):
        yield record["text"]
