"""The sandbox fails closed: without namespace isolation nothing untrusted runs unless the user opts out.

A machine without bubblewrap is simulated with a PATH that holds only `rustc`; one whose user
namespaces are disabled, with a `bwrap` that fails the way bubblewrap does there.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ternchat.verify import sandbox
from ternchat.verify.humaneval import load_problems
from ternchat.verify.sandbox import Limits, SandboxUnavailable, check_metadata, run_many, run_rust

REAL_RUSTC = shutil.which("rustc")
if REAL_RUSTC is None and os.environ.get("TERNCHAT_REQUIRE_RUSTC") != "1":
    pytest.skip("rustc is not installed", allow_module_level=True)

HELLO = 'fn main() { print!("hello"); }'


@pytest.fixture
def no_bwrap(tmp_path, monkeypatch) -> Path:
    """A PATH with rustc and nothing else: no bubblewrap, as on a fresh machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rustc").symlink_to(REAL_RUSTC)
    monkeypatch.setenv("PATH", str(bin_dir))
    sandbox.isolation.cache_clear()
    yield bin_dir
    sandbox.isolation.cache_clear()


@pytest.fixture
def broken_bwrap(no_bwrap) -> Path:
    """A bwrap that fails like bubblewrap does where unprivileged user namespaces are disabled."""
    fake = no_bwrap / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    sandbox.isolation.cache_clear()
    return no_bwrap


def test_without_bubblewrap_nothing_is_compiled_or_run(no_bwrap):
    iso = sandbox.isolation()
    assert not iso.namespaces and "not installed" in iso.why_not_isolated
    for attempt in (lambda: run_rust(HELLO), lambda: run_many([HELLO, HELLO]), lambda: check_metadata("pub fn f() {}")):
        with pytest.raises(SandboxUnavailable) as refused:
            attempt()
        message = str(refused.value)
        assert "apt-get install bubblewrap" in message and "--allow-unisolated" in message
        assert "eval.allow_unisolated" in message


def test_disabled_user_namespaces_are_refused_with_bwraps_reason(broken_bwrap):
    with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace"):
        run_rust(HELLO)


def test_explicit_opt_out_runs_and_warns(no_bwrap, capsys):
    sandbox._warn_unisolated.cache_clear()
    outcome = run_rust(HELLO, limits=Limits(allow_unisolated=True))
    assert outcome.outcome == "ok" and outcome.stdout == "hello"
    warning = capsys.readouterr().err
    assert "WITHOUT namespace isolation" in warning and "read every file" in warning and "network" in warning


def ternchat(*args: str, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "ternchat", *args], env=env, capture_output=True, text=True)


def test_cli_eval_exits_non_zero_and_writes_nothing(no_bwrap, tmp_path):
    problem = load_problems()[0]
    (tmp_path / "c.jsonl").write_text(json.dumps({"name": problem.name, "completion": problem.reference}) + "\n")
    args = ["eval", "humaneval-rust", "--completions", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out")]
    refused = ternchat(*args, path=str(no_bwrap))
    assert refused.returncode == 1
    assert "apt-get install bubblewrap" in refused.stderr and "--allow-unisolated" in refused.stderr
    assert not (tmp_path / "out").exists()
    allowed = ternchat(*args, "--allow-unisolated", path=str(no_bwrap))
    assert allowed.returncode == 0, allowed.stderr
    assert "WITHOUT namespace isolation" in allowed.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pass@k"]["pass@1"] == 1.0


def test_remove_tree_deletes_what_a_hostile_program_can_leave(tmp_path):
    from ternchat.verify.sandbox import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("must survive")
    root = tmp_path / "work"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # deeper than Python's recursion limit, and longer than PATH_MAX as one path
        os.mkdir("a", dir_fd=fd)
        inner = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    for i in range(200):
        (root / f"f{i}").write_bytes(b"x")
    (root / "link").symlink_to(outside)
    locked = root / "locked"
    (locked / "sub").mkdir(parents=True)
    (locked / "sub" / "file").write_text("x")
    locked.chmod(0o000)
    remove_tree(root)
    assert not root.exists()
    assert (outside / "keep.txt").read_text() == "must survive"
