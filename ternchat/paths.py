"""Where ternchat keeps data caches: `$TERNCHAT_HOME`, default `~/.cache/ternchat`."""

from __future__ import annotations

import os
from pathlib import Path


def ternchat_home() -> Path:
    home = os.environ.get("TERNCHAT_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".cache" / "ternchat"
    path.mkdir(parents=True, exist_ok=True)
    return path
