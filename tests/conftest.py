"""Shared fixtures: hand-written crates in tests/fixtures, and real crates fetched from Debian.

Real Debian crates come through ternchat's own `--debian` path (apt-get download + dpkg-deb).
Where apt is missing those tests skip, unless TERNCHAT_REQUIRE_DEBIAN=1 (as in CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ternchat.data.debian import fetch_debian_crates
from ternchat.data.errors import DataError

FIXTURE_CRATES = Path(__file__).parent / "fixtures" / "crates"
# Small, hand-written crates (about 0.8 MB of Rust together).
DEBIAN_TEST_PACKAGES = ["librust-walkdir-dev", "librust-smallvec-dev", "librust-globset-dev",
                        "librust-fern-dev", "librust-radix-trie-dev", "librust-xxhash-rust-dev"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNCHAT_HOME", str(tmp_path / "ternchat_home"))


@pytest.fixture
def fixture_crates() -> Path:
    return FIXTURE_CRATES


@pytest.fixture(scope="session")
def debian_roots(tmp_path_factory) -> list[Path]:
    cache = os.environ.get("TERNCHAT_TEST_CACHE")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("debian")
    required = os.environ.get("TERNCHAT_REQUIRE_DEBIAN") == "1"
    if shutil.which("apt-get") is None and not required:
        pytest.skip("needs apt-get to fetch real Debian crates")
    try:
        return fetch_debian_crates(DEBIAN_TEST_PACKAGES, cache_dir)
    except DataError as e:
        if required:
            raise
        pytest.skip(f"cannot fetch Debian crates: {e}")


@pytest.fixture(scope="session")
def real_rust_files(debian_roots) -> list[Path]:
    files = sorted(p for root in debian_roots for p in root.rglob("*.rs"))
    assert len(files) > 50, "the Debian test crates should hold dozens of .rs files"
    return files


@pytest.fixture(scope="session")
def sandbox_ready() -> None:
    """Skip unless rustc and the sandbox's namespaces work here; fail instead where CI requires
    them (TERNCHAT_REQUIRE_SANDBOX=1)."""
    from ternchat.verify.sandbox import Limits, SandboxUnavailable, checked_isolation

    try:
        checked_isolation(Limits())
    except SandboxUnavailable as e:
        if os.environ.get("TERNCHAT_REQUIRE_SANDBOX") == "1":
            raise
        pytest.skip(f"the rustc sandbox is unavailable here: {e}")
