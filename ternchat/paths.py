"""Where ternchat keeps data caches: `$TERNCHAT_HOME`, default `~/.cache/ternchat`."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def ternchat_home() -> Path:
    home = os.environ.get("TERNCHAT_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".cache" / "ternchat"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A scratch folder that becomes `out` only when the `with` block completes.

    An interrupted build leaves `<out>.partial`, which the next build clears, and never a
    half-written `out` that a cache check could mistake for a finished one.
    """
    scratch = out.with_name(out.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    yield scratch
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
