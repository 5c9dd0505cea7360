"""Rust's own sources from Debian's `rustc` source package, its UI tests tagged by their annotations.

`--rustc-src` (`data.rustc_src`) downloads the `rustc` source package (`apt-get source
--download-only`, through the private apt state of `ternchat/data/debian.py`) and unpacks four
parts of its upstream tarball: `library/` (core, alloc, std, ...), `compiler/` (the rustc_* crates),
`src/tools/` (clippy, rustfmt, rust-analyzer, compiletest, ...) and `tests/ui/`. Left out of
`src/tools`: `rustc-perf`, whose benchmarks are vendored copies of crates.io crates, and `cargo`,
which Debian ships as its own crate; both would put other versions of Debian's crates (val ones
among them) into train. Their crates are named `rustc:<name>` (`rustc:core`, `rustc:traits` for the UI
tests under `tests/ui/traits/`), so none shares a name with a crates.io crate, and none is ever in val.

Each UI test says what the compiler must do with it, and that becomes its compile tag without
running rustc (compiletest's directives, in the `//@ ` form of current rustc or the `// ` form of
older ones):
- `compiles`: a pass mode (`check-pass`, `build-pass`, `run-pass`, `run-fail`: it builds and then
  panics or exits non-zero) and no `//~ ERROR` annotation; also every file under an `auxiliary/`
  folder (helper crates that the tests link);
- `fails`: a `check-fail` or `build-fail` mode, any `//~ ERROR` annotation (`//[rev]~^ ERROR` included),
  or no pass mode at all (a UI test expects errors unless it says otherwise).
`//@ edition:YEAR` sets a test's edition; without it compiletest uses 2015, and so do the tags.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ternchat.data.debian import AptSource
from ternchat.data.discover import SourceFile, scan_root
from ternchat.data.errors import DataError

ORIGIN = "rustc"
UI_ORIGIN = "rustc-ui"
PARTS = ("library", "compiler", "src/tools", "tests/ui")
LEFT_OUT = ("src/tools/rustc-perf", "src/tools/cargo")
PASS_MODES = ("check-pass", "build-pass", "run-pass", "run-fail")
FAIL_MODES = ("check-fail", "build-fail")
_DIRECTIVE = re.compile(r"^\s*//(?:@|\s)\s*([a-z-]+)\s*(?::\s*(\S+))?", re.MULTILINE)
_ERROR = re.compile(r"//(?:\[[^\]]*\])?~[|^v]*\s*ERROR")


def expected_outcome(text: str, in_auxiliary: bool) -> tuple[str, str]:
    """A UI test's compile tag ("compiles" or "fails") and edition, from its annotations."""
    modes, edition = set(), "2015"
    for name, value in _DIRECTIVE.findall(text):
        if name in PASS_MODES or name in FAIL_MODES:
            modes.add(name)
        elif name == "edition" and value:
            edition = value
    if in_auxiliary:
        return "compiles", edition
    if _ERROR.search(text) or modes & set(FAIL_MODES) or not modes & set(PASS_MODES):
        return "fails", edition
    return "compiles", edition


ORIGINS = (ORIGIN, UI_ORIGIN)
CRATE_PREFIX = f"{ORIGIN}:"


def scan(root: Path, origin: str) -> list[SourceFile]:
    """The `.rs` files of one of `fetch_rustc_source`'s roots, crates named `rustc:<name>`."""
    return scan_ui_tests(root) if origin == UI_ORIGIN else scan_root(root, origin, CRATE_PREFIX)


def scan_ui_tests(root: Path) -> list[SourceFile]:
    """The UI tests under `root` (`tests/ui`), each with its expected outcome and edition."""
    files = []
    for f in scan_root(root, UI_ORIGIN, CRATE_PREFIX):
        try:
            text = Path(f.abspath).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        expect, edition = expected_outcome(text, "auxiliary" in Path(f.path).parts)
        files.append(SourceFile(f.crate, f.version, f.license, edition, f.origin, f.path, f.abspath, expect))
    return files


def _tarball(folder: Path) -> Path | None:
    found = sorted(folder.glob("rustc_*.orig.tar.*"))
    return found[-1] if found else None


def fetch_rustc_source(apt: AptSource, cache_dir: Path) -> list[tuple[Path, str]]:
    """Download and unpack the parts of Rust's sources (see the module docstring) from `apt`'s release;
    return the source roots with their origins. Both steps are cached under `cache_dir`."""
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if _tarball(downloads) is None:
        apt.ensure_lists()
        print(f"downloading Debian {apt.release}'s rustc source package (about 85 MB) ...")
        result = subprocess.run(apt.command("apt-get", "source", "--download-only", "rustc"), cwd=downloads,
                                capture_output=True, text=True)
        # Some releases' indexes name files the mirror no longer has (the .dsc, an orig-extra tarball):
        # apt then fails although the upstream tarball, all this needs, arrived and passed its checksum.
        if _tarball(downloads) is None:
            raise DataError(f"`apt-get source rustc` for Debian {apt.release} got no upstream tarball: "
                            f"{(result.stderr or result.stdout).strip()[-500:]}")
    tarball = _tarball(downloads)
    tree = cache_dir / "unpacked" / tarball.name.split(".orig")[0]
    if not (tree / ".unpacked").exists():
        tree.mkdir(parents=True, exist_ok=True)
        wanted = [f"rustc-*-src/{part}/*" for part in PARTS]
        left_out = [f"--exclude=rustc-*-src/{part}" for part in LEFT_OUT]
        result = subprocess.run(["tar", "-xf", str(tarball), "-C", str(tree), "--strip-components=1", "--wildcards",
                                 *left_out, *wanted], capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(f"could not unpack {tarball}: {result.stderr.strip()[-500:]}")
        (tree / ".unpacked").touch()
    return [(tree / part, UI_ORIGIN if part == "tests/ui" else ORIGIN) for part in PARTS]
