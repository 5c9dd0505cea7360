"""`ternchat bench dedup`: near-duplicate detection with rensa against datasketch, on the real corpus.

Both libraries sketch the same 5-word shingles of every kept corpus file with 128 permutations.
Reported: the time to shingle (shared), the time each library takes to hash the shingles into a
sketch, and how well each sketch estimates the exact Jaccard similarity of the same file pairs
(each file with its most similar file of the same crate, as either library sees it, so neither is
favoured), including how often each puts a pair on the other side of the near-duplicate threshold
than the exact value does. datasketch is the baseline
and is not a dependency of ternchat: `pip install datasketch` to measure it.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import rensa

from ternchat.data.clean import MINHASH_SEED, shingles
from ternchat.train.report import machine


def _nearest_pairs(crates: list[str], digests: list[np.ndarray], count: int, per_crate: int = 400,
                   seed: int = 0) -> set[tuple[int, int]]:
    """Each file paired with its most similar file of the same crate by one sketch's estimate (at most
    `per_crate` files a crate), then `count` of those pairs drawn at random: the pairs a near-duplicate
    filter must judge, many of them close to any threshold."""
    by_crate: dict[str, list[int]] = defaultdict(list)
    for i, crate in enumerate(crates):
        by_crate[crate].append(i)
    rng = random.Random(seed)
    pairs = set()
    for files in by_crate.values():
        files = rng.sample(files, min(len(files), per_crate))
        if len(files) < 2:
            continue
        for sketches in digests:
            block = np.stack([sketches[i] for i in files])
            similarity = np.zeros((len(files), len(files)))
            for k in range(block.shape[1]):
                similarity += block[:, k, None] == block[None, :, k]
            np.fill_diagonal(similarity, -1)
            for a, b in enumerate(similarity.argmax(axis=1)):
                pairs.add((min(files[a], files[b]), max(files[a], files[b])))
    return set(rng.sample(sorted(pairs), min(count, len(pairs))))


def bench_dedup(corpus_dir: Path, num_perm: int, threshold: float, pairs: int = 3000, log=print) -> dict:
    docs = [json.loads(line) for split in ("train", "val") for line in open(corpus_dir / f"{split}.jsonl")]
    log(f"{len(docs)} corpus files from {corpus_dir}")
    start = time.perf_counter()
    tokens = [shingles(d["text"]) for d in docs]
    shingle_s = time.perf_counter() - start

    start = time.perf_counter()
    sketches = []
    for t in tokens:
        sketch = rensa.RMinHash(num_perm=num_perm, seed=MINHASH_SEED)
        sketch.update(t)
        sketches.append(sketch)
    rensa_s = time.perf_counter() - start
    estimates = {"rensa": lambda i, j: sketches[i].jaccard(sketches[j])}
    timings = {"rensa": rensa_s}
    try:
        from datasketch import MinHash
    except ImportError:
        log("datasketch is not installed: no baseline (pip install datasketch)")
    else:
        start = time.perf_counter()
        baseline = []
        for t in tokens:
            sketch = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
            sketch.update_batch([s.encode() for s in t])
            baseline.append(sketch.hashvalues)
        timings["datasketch"] = time.perf_counter() - start
        estimates["datasketch"] = lambda i, j: float(np.mean(baseline[i] == baseline[j]))

    digests = [[np.array(s.digest(), dtype=np.uint32) for s in sketches]] + ([baseline] if len(timings) > 1 else [])
    sample = sorted(_nearest_pairs([d["crate"] for d in docs], digests, pairs))
    sets = {}
    exact = []
    for i, j in sample:
        a = sets.setdefault(i, set(tokens[i]))
        b = sets.setdefault(j, set(tokens[j]))
        exact.append(len(a & b) / len(a | b))
    exact = np.array(exact)
    accuracy = {}
    for name, estimate in estimates.items():
        est = np.array([estimate(i, j) for i, j in sample])
        accuracy[name] = {"mean_abs_error": float(np.abs(est - exact).mean()),
                          "max_abs_error": float(np.abs(est - exact).max()),
                          "wrong_side_of_threshold": int(((est >= threshold) != (exact >= threshold)).sum())}
    return {"machine": machine(), "files": len(docs), "shingles": sum(map(len, tokens)), "num_perm": num_perm,
            "threshold": threshold, "shingle_seconds": shingle_s, "hash_seconds": timings,
            "pairs": len(sample), "pairs_above_threshold": int((exact >= threshold).sum()), "accuracy": accuracy}


def format_dedup(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; {r['files']:,} files, {r['shingles']:,} shingles, "
             f"{r['num_perm']} permutations.",
             f"Shingling (shared by both): {r['shingle_seconds']:.1f} s.", "",
             f"Accuracy on {r['pairs']:,} pairs, each file with its most similar file of its crate, "
             f"{r['pairs_above_threshold']} of them at or above the near-duplicate threshold {r['threshold']} "
             "(exact Jaccard of the shingle sets).", "",
             "| library | hash into sketches | speed vs datasketch | mean / max abs Jaccard error | "
             "pairs judged on the wrong side of the threshold |", "|---|---|---|---|---|"]
    base = r["hash_seconds"].get("datasketch")
    for name, seconds in r["hash_seconds"].items():
        a = r["accuracy"][name]
        speed = f"{base / seconds:.1f}x" if base else "(no baseline)"
        lines.append(f"| {name} | {seconds:.2f} s | {speed} | {a['mean_abs_error']:.4f} / {a['max_abs_error']:.3f} | "
                     f"{a['wrong_side_of_threshold']} |")
    return "\n".join(lines)
