"""Find Rust source files and the crate each belongs to.

A source root is any directory; every `.rs` file under it is attributed to the crate of its
nearest ancestor `Cargo.toml` (name, version, license and edition read from `[package]`), or, where no
`Cargo.toml` exists above it, to a crate named after its top-level folder under the root. Crate names are what the train/val
split keeps apart. `local_rust_roots()` lists the Rust sources a machine already has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SKIP_DIRS = {"target", ".git", ".hg", ".svn", "node_modules"}


@dataclass(frozen=True)
class SourceFile:
    crate: str
    version: str
    license: str
    edition: str
    origin: str  # which root it came from, e.g. "debian-registry"
    path: str  # path inside the crate
    abspath: str
    expect: str = ""  # the compile tag its source asserts ("compiles" or "fails"; rustc's UI tests), else ""


@dataclass(frozen=True)
class _Crate:
    name: str
    version: str
    license: str
    edition: str
    root: Path


def _read_manifest(cargo_toml: Path, fallback_name: str) -> _Crate:
    name, version, license, edition = fallback_name, "", "", "2015"  # Cargo's default edition
    try:
        package = tomllib.loads(cargo_toml.read_text(encoding="utf-8")).get("package", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        package = {}
    # Workspace-inherited fields are tables ({workspace = true}); keep only plain strings.
    if isinstance(package.get("name"), str):
        name = package["name"]
    if isinstance(package.get("version"), str):
        version = package["version"]
    if isinstance(package.get("license"), str):
        license = package["license"]
    elif isinstance(package.get("license-file"), str):
        license = "file:" + package["license-file"]
    if isinstance(package.get("edition"), str):
        edition = package["edition"]
    return _Crate(name, version, license, edition, cargo_toml.parent)


def scan_root(root: Path, origin: str, crate_prefix: str = "") -> list[SourceFile]:
    """All `.rs` files under `root`, each with its crate (named `crate_prefix` + name)."""
    root = Path(root).resolve()
    default = _Crate(root.name, "", "", "2021", root)
    crate_of: dict[Path, _Crate] = {}
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if "Cargo.toml" in filenames:
            crate = _read_manifest(here / "Cargo.toml", here.name)
        elif here == root:
            crate = default
        elif here.parent == root and crate_of[root] is default:
            crate = _Crate(here.name, "", "", "2021", here)  # a top-level folder without Cargo.toml is its own unit
        else:
            crate = crate_of[here.parent]
        crate_of[here] = crate
        for name in sorted(filenames):
            if name.endswith(".rs"):
                abspath = here / name
                files.append(SourceFile(crate_prefix + crate.name, crate.version, crate.license, crate.edition, origin,
                                        abspath.relative_to(crate.root).as_posix(), str(abspath)))
    return files


def _rustc_sysroot() -> Path | None:
    rustc = shutil.which("rustc")
    if rustc is None:
        return None
    try:
        out = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def local_rust_roots() -> list[tuple[Path, str]]:
    """Rust sources already on this machine: Debian's crate registry, rust-src, ~/.cargo/registry/src."""
    candidates: list[tuple[Path, str]] = [(Path("/usr/share/cargo/registry"), "debian-registry")]
    for lib in sorted(Path("/usr/src").glob("rustc-*/library")):
        candidates.append((lib, "rust-src"))
    candidates.append((Path("/usr/lib/rustlib/src/rust/library"), "rust-src"))
    sysroot = _rustc_sysroot()
    if sysroot is not None:
        candidates.append((sysroot / "lib/rustlib/src/rust/library", "rust-src"))
    for lib in sorted(Path.home().glob(".rustup/toolchains/*/lib/rustlib/src/rust/library")):
        candidates.append((lib, "rust-src"))
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    for index in sorted((cargo_home / "registry" / "src").glob("*")):
        candidates.append((index, "cargo-registry"))
    seen: set[Path] = set()
    roots = []
    for path, origin in candidates:
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            roots.append((path, origin))
    return roots
