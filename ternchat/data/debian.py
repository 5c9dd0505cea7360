"""Fetch real Rust crates from Debian's `librust-*-dev` packages without installing them.

Each package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into the
ternchat cache; its crate sources then sit under `usr/share/cargo/registry/<name>-<version>/`.
Downloads and unpacks are cached, so a second run is offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from ternchat.data.errors import DataError

REGISTRY_SUBDIR = Path("usr/share/cargo/registry")


def curated_crates() -> list[str]:
    """The Debian packages shipped as ternchat's default corpus list."""
    text = resources.files("ternchat.data").joinpath("debian_crates.txt").read_text(encoding="utf-8")
    return parse_crate_list(text)


def parse_crate_list(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _require_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DataError(
            f"--debian needs {' and '.join(missing)} (a Debian or Ubuntu system). Alternatives: "
            "--source DIR with Rust crates you have; auto-discovery of ~/.cargo/registry/src "
            "(run `cargo fetch` in any Rust project to fill it); or --hf DATASET with the 'hf' extra.")


def _ensure_apt_lists() -> None:
    """`apt-get download` needs package lists; a fresh container has none."""
    if any(Path("/var/lib/apt/lists").glob("*_Packages*")):
        return
    if os.geteuid() != 0:
        raise DataError("apt has no package lists on this machine; run `sudo apt-get update` once, then retry.")
    print("apt has no package lists yet; running `apt-get update` ...")
    if subprocess.run(["apt-get", "update", "-qq"]).returncode != 0:
        raise DataError("`apt-get update` failed; check the network, or use --source DIR instead of --debian.")


def _downloaded(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _apt_download(packages: list[str], debs: Path) -> list[str]:
    """Download `packages` into `debs`; return the ones apt does not know."""
    result = subprocess.run(["apt-get", "download", *packages], cwd=debs,
                            capture_output=True, text=True)
    if result.returncode == 0:
        return []
    if len(packages) == 1:
        return packages
    unknown: list[str] = []
    for package in packages:  # find the culprit(s) one by one
        if _downloaded(debs, package) is None:
            unknown += _apt_download([package], debs)
    return unknown


def fetch_debian_crates(packages: list[str], cache_dir: Path, batch: int = 20) -> list[Path]:
    """Download and unpack `packages`; return the registry directories that hold their crates."""
    debs = cache_dir / "debs"
    unpacked = cache_dir / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    todo = [p for p in packages if _downloaded(debs, p) is None]
    unknown: list[str] = []
    if todo:
        _require_tools()
        _ensure_apt_lists()
        for i in tqdm(range(0, len(todo), batch), desc="apt-get download", unit="batch"):
            unknown += _apt_download(todo[i:i + batch], debs)
        if len(unknown) == len(packages):
            raise DataError(
                f"apt-get could not download any of the {len(packages)} packages (first: {packages[0]}). "
                "Run `apt-get update` first, or use --source DIR instead of --debian.")
        if unknown:
            print(f"warning: apt-get knows no package named {', '.join(unknown)}; skipped")
    roots = []
    for package in tqdm([p for p in packages if p not in unknown], desc="unpack", unit="pkg"):
        deb = _downloaded(debs, package)
        target = unpacked / deb.stem
        done = target / ".unpacked"
        if not done.exists():
            _require_tools()
            if target.exists():
                shutil.rmtree(target)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, capture_output=True)
            done.touch()
        registry = target / REGISTRY_SUBDIR
        if registry.is_dir():
            roots.append(registry)
    return roots
