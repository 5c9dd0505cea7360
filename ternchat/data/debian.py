"""Fetch real Rust crates from Debian's `librust-*-dev` packages without installing them.

Each package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into the
ternchat cache; its crate sources then sit under `usr/share/cargo/registry/<name>-<version>/`.
Downloads and unpacks are cached, so a second run is offline.

Package lists: the curated one shipped with ternchat (`debian_crates.txt`), a user's file, or
"all": every real-crate `librust-*-dev` package of a Debian release, read from apt's own list of
available packages (`apt-cache dumpavail`), without the feature packages
(`librust-foo+feature-dev`, which hold no code of their own), the `-sys` and `-ffi` crates, binding
crates and generated tables (`EXCLUDED`). `rust-src` adds the standard library's sources.

Releases: by default the machine's own apt and its package lists. `data.debian_releases` (`--debian-release
NAME`) takes each named release instead through a private apt state under
`$TERNCHAT_HOME/debian/releases/<name>/apt`: its own `sources.list` (deb and deb-src lines for that
release, signed by Debian's archive keyring), package lists, cache and an empty dpkg status, handed
to apt-get and apt-cache as `-o Dir::...` options, so the system's sources and lists are never
touched and any Debian or Ubuntu machine can fetch any Debian release's crates. `apt-get update`
runs when a release has no lists yet (delete its `apt/lists` folder to refresh them).
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from tqdm import tqdm

from ternchat.data.errors import DataError

REGISTRY_SUBDIR = Path("usr/share/cargo/registry")
RUST_SRC_PACKAGE = "rust-src"
CRATE_PACKAGE = re.compile(r"^librust-[a-z0-9][a-z0-9.-]*-dev$")  # no '+': feature packages are empty
# Crates that are bindings to C or other languages, or generated tables, as in the curated list's comment.
EXCLUDED = re.compile(r"-sys(-[0-9.]+)?-dev$|-ffi(-[0-9.]+)?-dev$|bindings|binding-|^librust-encoding-index-"
                      r"|tables?(-[0-9.]+)?-dev$|^librust-(winapi|windows|ntapi|sha1collisiondetection|"
                      r"perfrecord-mach-ipc-rendezvous|language-tags)")


DEB_FOLDER = re.compile(r"^(?P<package>[^_]+)_(?P<version>[^_]+)_(?P<arch>[^_]+)$")  # an unpacked .deb's stem


def system_release() -> str:
    """This machine's Debian (or Ubuntu) release codename, as in /etc/os-release."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or "system"
    except OSError:
        pass
    return "system"


def package_of_root(root: Path) -> dict | None:
    """The Debian release, package and version a source folder was unpacked from, read from its path
    (`.../releases/<release>/unpacked/<package>_<version>_<arch>/...`; without a release folder, the
    machine's own release), or None for a folder that is not an unpacked package."""
    parts = Path(root).parts
    if "unpacked" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("unpacked")
    match = DEB_FOLDER.match(parts[at + 1]) if at + 1 < len(parts) else None
    if match is None:
        return None
    above = parts[:at]
    release = above[len(above) - 1 - above[::-1].index("releases") + 1] if "releases" in above else system_release()
    return {"release": release, "package": match["package"], "version": unquote(match["version"])}


DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM_LISTS = Path("/var/lib/apt/lists")


@dataclass(frozen=True)
class AptSource:
    """Where packages come from: the machine's own apt (`release` "") or one Debian release through a
    private apt state (`state`), with the options that point apt-get and apt-cache at it."""

    release: str = ""
    state: Path | None = None
    options: tuple[str, ...] = field(default=())

    @property
    def origin(self) -> str:
        """The corpus's origin label of this source's crates."""
        return f"debian:{self.release}" if self.release else "debian"

    def cache_dir(self, debian_home: Path) -> Path:
        """The folder of this source's downloads (`debs/`) and unpacked packages (`unpacked/`)."""
        return debian_home / "releases" / self.release if self.release else debian_home

    def command(self, tool: str, *args: str) -> list[str]:
        return [tool, *self.options, *args]

    def ensure_lists(self) -> None:
        """Package lists must exist before apt can download; a fresh container (or release) has none."""
        lists = self.state / "lists" if self.state else SYSTEM_LISTS
        if any(lists.glob("*_Packages*")):
            return
        if self.state is None and os.geteuid() != 0:
            raise DataError("apt has no package lists on this machine; run `sudo apt-get update` once, then retry.")
        what = f"Debian {self.release}'s" if self.release else "this machine's"
        print(f"apt has no package lists for {what} packages yet; running `apt-get update` ...")
        result = subprocess.run(self.command("apt-get", "update", "-qq"), capture_output=True, text=True)
        if result.returncode != 0 or not any(lists.glob("*_Packages*")):
            raise DataError(f"`apt-get update` for {what} packages failed ({result.stderr.strip()[-500:]}); check "
                            "the release name and the network, or use --source DIR instead of --debian.")


SYSTEM_APT = AptSource()


def release_apt(release: str, debian_home: Path, mirror: str) -> AptSource:
    """A private apt state for Debian `release` from `mirror` (see the module docstring)."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", release):
        raise DataError(f"data.debian_releases: {release!r} is not a Debian release codename (e.g. bookworm, trixie)")
    if not DEBIAN_KEYRING.exists():
        raise DataError(f"--debian-release needs Debian's archive keyring at {DEBIAN_KEYRING}: "
                        "apt-get install debian-archive-keyring")
    _require_tools()
    state = debian_home / "releases" / release / "apt"
    for folder in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    signed = f"[signed-by={DEBIAN_KEYRING}]"
    (state / "sources.list").write_text(f"deb {signed} {mirror} {release} main\n"
                                        f"deb-src {signed} {mirror} {release} main\n")
    options = ("-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
               "-o", f"Dir::Etc::SourceParts={state / 'sources.list.d'}",
               "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
               "-o", f"Dir::State::Status={state / 'status'}", "-o", f"APT::Sandbox::User={getpass.getuser()}")
    return AptSource(release, state, options)


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


def all_crates(apt: AptSource = SYSTEM_APT) -> list[str]:
    """Every real-crate `librust-*-dev` package `apt` knows (see the module docstring)."""
    if shutil.which("apt-cache") is None:
        _require_tools()
    apt.ensure_lists()
    result = subprocess.run(apt.command("apt-cache", "dumpavail"), capture_output=True, text=True)
    names = crate_packages_from_apt(result.stdout) if result.returncode == 0 else []
    if not names:
        raise DataError("apt knows no librust-*-dev packages here (`apt-cache dumpavail` lists none); run "
                        "`apt-get update`, or use --source DIR instead of --debian all.")
    return names


def resolve_package_list(spec: str, apt: AptSource = SYSTEM_APT) -> list[str]:
    """`data.debian_crates`: "" = the curated list, "all" = every real-crate package, else a file of names."""
    if not spec:
        return curated_crates()
    if spec == "all":
        return all_crates(apt)
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


def _downloaded(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _apt_download(packages: list[str], debs: Path, apt: AptSource) -> list[str]:
    """Download `packages` into `debs`; return the ones apt does not know."""
    result = subprocess.run(apt.command("apt-get", "download", *packages), cwd=debs, capture_output=True, text=True)
    if result.returncode == 0:
        return []
    if len(packages) == 1:
        return packages
    unknown: list[str] = []
    for package in packages:  # find the culprit(s) one by one
        if _downloaded(debs, package) is None:
            unknown += _apt_download([package], debs, apt)
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


def fetch_debian_crates(packages: list[str], cache_dir: Path, batch: int = 50, workers: int = 0,
                        apt: AptSource = SYSTEM_APT) -> list[Path]:
    """Download (from `apt`) and unpack `packages` under `cache_dir`; return the folders that hold
    their sources: each crate package's registry folder, and the standard library's for `rust-src`."""
    debs = cache_dir / "debs"
    unpacked = cache_dir / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    todo = [p for p in packages if _downloaded(debs, p) is None]
    unknown: list[str] = []
    if todo:
        _require_tools()
        apt.ensure_lists()
        for i in tqdm(range(0, len(todo), batch), desc="apt-get download", unit="batch"):
            unknown += _apt_download(todo[i:i + batch], debs, apt)
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
