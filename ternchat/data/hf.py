"""Optional source: Rust files from a Hugging Face dataset (e.g. a Rust subset of The Stack).

Needs the `hf` extra (`pip install 'ternchat[hf]'`) and network access to the Hub. Rows are
streamed and written once under the cache as `<repository>/<path>`, so each repository becomes
one crate for the train/val split, and later runs read the cached files offline.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tqdm import tqdm

from ternchat.data.errors import DataError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(part: str) -> str:
    return _UNSAFE.sub("_", part).strip("._") or "_"


def materialize_hf_dataset(name: str, max_files: int, cache_dir: Path) -> Path:
    """Stream up to `max_files` Rust files of dataset `name` into the cache; return that folder."""
    root = Path(cache_dir) / hashlib.sha256(f"{name}:{max_files}".encode()).hexdigest()[:16]
    if (root / ".complete").exists():
        return root
    try:
        import datasets
    except ImportError:
        raise DataError("--hf needs the 'hf' extra: pip install 'ternchat[hf]'") from None
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # the Hub client raises many types; all mean "cannot load"
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {e}") from None
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    for row in tqdm(rows, total=max_files, desc=f"hf:{name}", unit="file"):
        text = row.get("content") or row.get("text")
        repo = row.get("max_stars_repo_name") or row.get("repo_name") or row.get("repository") or "unknown"
        path = row.get("max_stars_repo_path") or row.get("path") or f"file_{written}.rs"
        if not isinstance(text, str) or not str(path).endswith(".rs"):
            continue
        target = root / _safe(str(repo)) / Path(*[_safe(p) for p in Path(str(path)).parts])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written += 1
        if written >= max_files:
            break
    (root / ".complete").touch()
    return root
