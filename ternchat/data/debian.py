"""Fetch real Rust crates from Debian's `librust-*-dev` packages without installing them.

Each package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into the
ternchat cache; its crate sources then sit under `usr/share/cargo/registry/<name>-<version>/`.
Downloads and unpacks are cached, so a second run is offline.

Package lists: the curated one shipped with ternchat (`debian_crates.txt`), a user's file, or
"all": every real-crate `librust-*-dev` package of the machine's Debian release, read from apt's
own list of available packages (`apt-cache dumpavail`), without the feature packages
(`librust-foo+feature-dev`, which hold no code of their own), the `-sys` and `-ffi` crates, binding
crates and generated tables (`EXCLUDED`). `rust-src` adds the standard library's sources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from ternchat.data.errors import DataError

REGISTRY_SUBDIR = Path("usr/share/cargo/registry")
RUST_SRC_PACKAGE = "rust-src"
CRATE_PACKAGE = re.compile(r"^librust-[a-z0-9][a-z0-9.-]*-dev$")  # no '+': feature packages are empty
# Crates that are bindings to C or other languages, or generated tables, as in the curated list's comment.
EXCLUDED = re.compile(r"-sys(-[0-9.]+)?-dev$|-ffi(-[0-9.]+)?-dev$|bindings|binding-|^librust-encoding-index-"
                      r"|tables?(-[0-9.]+)?-dev$|^librust-(winapi|windows|ntapi|sha1collisiondetection|"
                      r"perfrecord-mach-ipc-rendezvous|language-tags)")


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


def crate_packages_from_apt(available: str) -> list[str]:
    """The real-crate package names in `apt-cache dumpavail` output (virtual packages never appear there)."""
    names = set()
    for line in available.splitlines():
        if line.startswith("Package: "):
            name = line[len("Package: "):].strip()
            if CRATE_PACKAGE.match(name) and not EXCLUDED.search(name):
                names.add(name)
    return sorted(names)


def all_crates() -> list[str]:
    """Every real-crate `librust-*-dev` package this machine's apt knows (see the module docstring)."""
    if shutil.which("apt-cache") is None:
        _require_tools()
    _ensure_apt_lists()
    result = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True)
    names = crate_packages_from_apt(result.stdout) if result.returncode == 0 else []
    if not names:
        raise DataError("apt knows no librust-*-dev packages here (`apt-cache dumpavail` lists none); run "
                        "`apt-get update`, or use --source DIR instead of --debian all.")
    return names


def resolve_package_list(spec: str) -> list[str]:
    """`data.debian_crates`: "" = the curated list, "all" = every real-crate package, else a file of names."""
    if not spec:
        return curated_crates()
    if spec == "all":
        return all_crates()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data.debian_crates: no such file {path} (use \"\" for the curated list or \"all\")")
    return parse_crate_list(path.read_text(encoding="utf-8"))


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


def _unpack(deb: Path, target: Path) -> None:
    done = target / ".unpacked"
    if done.exists():
        return
    _require_tools()
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, capture_output=True)
    done.touch()


def fetch_debian_crates(packages: list[str], cache_dir: Path, batch: int = 50, workers: int = 0) -> list[Path]:
    """Download and unpack `packages`; return the folders that hold their sources: each crate
    package's registry folder, and the standard library's for `rust-src`."""
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
    deb_of = {p: _downloaded(debs, p) for p in packages if p not in unknown}
    target_of = {p: unpacked / deb.stem for p, deb in deb_of.items()}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # dpkg-deb runs outside the GIL
        jobs = pool.map(lambda p: _unpack(deb_of[p], target_of[p]), deb_of)
        for _ in tqdm(jobs, total=len(deb_of), desc="unpack", unit="pkg"):
            pass
    roots = []
    for package, target in target_of.items():
        if package == RUST_SRC_PACKAGE:
            roots += sorted(p for p in (target / "usr/src").glob("rustc-*/library") if p.is_dir())
        elif (target / REGISTRY_SUBDIR).is_dir():
            roots.append(target / REGISTRY_SUBDIR)
    return roots
