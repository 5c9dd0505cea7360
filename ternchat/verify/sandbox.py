"""Compile and run untrusted Rust with the real `rustc`, contained.

Each program gets a fresh temporary folder and is compiled with `rustc --error-format=json`
(diagnostics parsed into error codes), then run with stdin closed, a scrubbed environment, wall-
clock limits for both phases, resource limits (`prlimit`: CPU seconds, address space, file size,
processes, open files, no core dumps), bounded captured output, and its whole process group
killed at the end. Where bubblewrap (`bwrap`) is available, both phases run in new mount, PID,
network, IPC and UTS namespaces that see only the toolchain (read-only) and the temporary folder:
no network, no host files (so neither `include_str!("/etc/shadow")` at compile time nor reading
`~/.ssh` at run time finds anything), and every process dies with the sandbox. When ternchat runs
as root, the program itself runs under an unprivileged uid (one per pool slot) so the process
limit bites. `isolation()` reports which mechanisms are active. Every outcome gets one class, and
no program can end an evaluation: any failure of one sample becomes its outcome, and its folder is
removed iteratively (`remove_tree`) whatever it left there.

The sandbox fails closed: where the namespaces cannot be had (bubblewrap missing, or user
namespaces disabled) nothing is compiled or run and `SandboxUnavailable` names the fix, unless the
caller opts out with `Limits(allow_unisolated=True)` (`--allow-unisolated`,
`eval.allow_unisolated = true`); then a warning says what the programs can reach.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

OUTCOMES = ("ok", "compile_error", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
SANDBOX_DIR = "/sandbox"
BASE_UID = 61000  # unprivileged uids used for sandboxed programs when ternchat runs as root
_ALLOC_FAILED = re.compile(r"memory allocation of \d+ bytes failed|out of memory|capacity overflow")


class SandboxUnavailable(RuntimeError):
    """Untrusted Rust cannot be compiled or run safely here; the message says how to fix it."""


class RustcMissing(SandboxUnavailable):
    pass


@dataclass(frozen=True)
class Limits:
    """What a sandboxed program may use, and whether it may run at all without namespace isolation."""

    compile_seconds: float = 30.0
    run_seconds: float = 10.0
    cpu_seconds: int = 10
    compile_memory_bytes: int = 4 << 30
    run_memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 32
    output_bytes: int = 1 << 20
    allow_unisolated: bool = False  # without bwrap: run anyway, with host files and network reachable


@dataclass
class Outcome:
    outcome: str  # one of OUTCOMES
    phase: str  # "compile" or "run"
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error_codes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    rustc: str
    sysroot: str
    bwrap: str  # its path where the namespaces work, else ''
    namespaces: bool  # bubblewrap: private filesystem view, no network, own PID space
    drop_uid: bool  # the program runs under an unprivileged uid
    prlimit: bool
    network: str
    filesystem: str
    why_not_isolated: str = ""  # what the namespace probe found, when namespaces are off

    def describe(self) -> str:
        return (f"rustc {self.rustc}; filesystem: {self.filesystem}; network: {self.network}; "
                f"uid: {'unprivileged per slot' if self.drop_uid else 'the invoking user'}; rlimits: "
                f"{'CPU, address space, file size, processes, open files, core' if self.prlimit else 'none'}; "
                "scrubbed env, stdin closed, wall-clock limits, process-group kill")


def _rustc_path() -> Path:
    rustc = shutil.which("rustc")
    if rustc is None:
        raise RustcMissing("rustc is not on PATH. Install it: `apt-get install rustc` (Debian/Ubuntu) or "
                           "rustup (https://rustup.rs), then retry.")
    sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60)
    if sysroot.returncode != 0:
        raise RustcMissing(f"`rustc --print sysroot` failed: {sysroot.stderr.strip()}")
    real = Path(sysroot.stdout.strip()) / "bin" / "rustc"  # past rustup's proxy, which needs $HOME
    return real if real.exists() else Path(rustc)


def _namespace_probe(bwrap: str | None, sysroot: Path) -> str:
    """'' when bubblewrap can build the sandbox's namespaces here, else why not."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        probe = subprocess.run(_bwrap_prefix(bwrap, sysroot, Path("/tmp"), os.geteuid() == 0) + ["true"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{bwrap} could not be run ({e})"
    if probe.returncode != 0:
        detail = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit status {probe.returncode}"
        return f"{bwrap} cannot create namespaces here ({detail}); user namespaces may be disabled"
    return ""


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Find rustc and probe which isolation mechanisms work on this machine (cached)."""
    rustc = _rustc_path()
    sysroot = rustc.parent.parent
    bwrap = shutil.which("bwrap")  # resolved here: the sandbox's own processes get a minimal PATH
    why_not = _namespace_probe(bwrap, sysroot)
    namespaces = not why_not
    return Isolation(str(rustc), str(sysroot), bwrap if namespaces else "", namespaces,
                     os.geteuid() == 0 and shutil.which("setpriv") is not None,
                     shutil.which("prlimit") is not None,
                     "none (own network namespace)" if namespaces else "host network (no bwrap)",
                     "toolchain read-only + temporary folder" if namespaces else "host (no bwrap)", why_not)


def checked_isolation(limits: Limits) -> Isolation:
    """The isolation to run untrusted code with; refuses (SandboxUnavailable) without namespaces
    unless `limits.allow_unisolated`, and then warns once per process what the programs can reach."""
    iso = isolation()
    if iso.namespaces:
        return iso
    if not limits.allow_unisolated:
        raise SandboxUnavailable(
            f"refusing to compile or run untrusted Rust without namespace isolation: {iso.why_not_isolated}. "
            "Fix: `apt-get install bubblewrap` (or `bash scripts/setup.sh`), with user namespaces allowed. "
            "To run anyway, at your own risk, pass --allow-unisolated (or set eval.allow_unisolated = true): "
            "the programs can then read every file and reach every network this user can.")
    _warn_unisolated(iso.why_not_isolated)
    return iso


@lru_cache(maxsize=None)
def _warn_unisolated(reason: str) -> None:
    print(f"warning: running untrusted Rust WITHOUT namespace isolation (--allow-unisolated; {reason}): "
          "programs can read every file this user can read (ssh keys, tokens, the home folder), reach the "
          "network and signal this user's processes; only wall-clock and resource limits apply.",
          file=sys.stderr)


def _bwrap_prefix(bwrap: str, sysroot: Path, workdir: Path, as_root: bool,
                  env: dict[str, str] | None = None) -> list[str]:
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid", "--unshare-ipc",
           "--unshare-uts"]
    if not as_root:
        cmd += ["--unshare-user"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for extra in ("/etc/alternatives", "/etc/ld.so.cache"):  # the C linker `cc` is an alternatives link
        if os.path.exists(extra):
            cmd += ["--ro-bind", extra, extra]
    if not str(sysroot).startswith("/usr/"):
        cmd += ["--ro-bind", str(sysroot), str(sysroot)]
    cmd += ["--bind", str(workdir), SANDBOX_DIR, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--chdir", SANDBOX_DIR, "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SANDBOX_DIR]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    return cmd + ["--"]


def _prlimit(iso: Isolation, memory: int, cpu: int, limits: Limits, processes: int | None) -> list[str]:
    if not iso.prlimit:
        return []
    cmd = ["prlimit", f"--as={memory}", f"--cpu={cpu}", f"--fsize={limits.file_bytes}", "--nofile=256", "--core=0"]
    if processes is not None:
        cmd.append(f"--nproc={processes}")
    return cmd + ["--"]


def _communicate(proc: subprocess.Popen, timeout: float, max_output: int) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until exit; returns (stdout, stderr, '' | 'timeout' | 'output_limit')."""
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total = 0
    verdict = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                verdict = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                total += len(data)
                chunks[key.fd].append(data)
                if total > max_output:
                    verdict = "output_limit"
                    break
            if verdict:
                break
    if verdict:
        _kill(proc)
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not verdict else 5)
    except subprocess.TimeoutExpired:
        verdict = verdict or "timeout"
        _kill(proc)
        proc.wait()
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()]), verdict


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8", **(env or {})},
                            start_new_session=True, close_fds=True)


def parse_diagnostics(stderr: str) -> tuple[list[str], list[str]]:
    """Error codes (E0308, ...) and messages of rustc's JSON diagnostics, errors only."""
    codes, messages = [], []
    for line in stderr.splitlines():
        if not line.startswith("{"):
            continue
        try:
            diag = json.loads(line)
        except ValueError:
            continue
        if diag.get("level") != "error":
            continue
        message = diag.get("message", "")
        if message.startswith("aborting due to"):
            continue
        messages.append(message)
        if diag.get("code"):
            codes.append(diag["code"]["code"])
    return codes, messages


def _decode(data: bytes, limit: int = 20_000) -> str:
    return data[:limit].decode("utf-8", errors="replace")


def _classify_run(returncode: int, stderr: str, verdict: str) -> str:
    if verdict:
        return verdict
    if returncode == 0:
        return "ok"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return "timeout"  # the CPU-seconds limit ended it
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
        return "output_limit"  # the file-size limit ended it
    if _ALLOC_FAILED.search(stderr):
        return "memory_limit"
    return "runtime_error"


@dataclass(frozen=True)
class Program:
    """A Rust program to compile and run: a binary with `main`, or with `test_harness` a crate of
    `#[test]` functions compiled with `rustc --test`, which passes when every test passes."""

    source: str
    edition: str = "2021"
    test_harness: bool = False


def _rustc(workdir: Path, args: Sequence[str], limits: Limits, env: dict[str, str] | None = None) -> Outcome:
    """Run rustc with `args` inside `workdir`, sandboxed; outcome 'ok' or the class of its failure."""
    iso = checked_isolation(limits)
    wrap = _bwrap_prefix(iso.bwrap, Path(iso.sysroot), workdir, os.geteuid() == 0, env) if iso.namespaces else []
    cmd = (_prlimit(iso, limits.compile_memory_bytes, int(limits.compile_seconds) + 5, limits, None) + wrap
           + [iso.rustc, *args, "--error-format=json"])
    start = time.perf_counter()
    proc = _spawn(cmd, workdir, env)
    _, err, verdict = _communicate(proc, limits.compile_seconds, limits.output_bytes * 8)
    seconds = time.perf_counter() - start
    if verdict:
        return Outcome("timeout" if verdict == "timeout" else "sandbox_error", "compile", proc.returncode,
                       compile_seconds=seconds)
    if proc.returncode == 0:
        return Outcome("ok", "compile", 0, compile_seconds=seconds)
    codes, messages = parse_diagnostics(err.decode("utf-8", errors="replace"))
    if not messages:  # rustc itself failed (killed, missing linker, ...): not the program's fault
        return Outcome("sandbox_error", "compile", proc.returncode, stderr=_decode(err), compile_seconds=seconds)
    return Outcome("compile_error", "compile", proc.returncode, error_codes=codes, messages=messages,
                   compile_seconds=seconds)


def remove_tree(root: Path) -> None:
    """Delete `root` and whatever a program left in it: iteratively (a 3000-deep chain of folders
    would overflow a recursive walk), through one directory descriptor at a time (its paths may be
    longer than PATH_MAX) and opening folders the program made unreadable. Never follows links."""
    names: list[str] = []  # the path from `root` down to the folder being emptied
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                try:
                    os.chmod(child, 0o700, dir_fd=fd)  # a folder the program made unreadable
                except PermissionError:
                    pass
                inner = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
                names.append(child)
                continue
            if not names:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(root)


def _clean_up(workdir: Path) -> None:
    try:
        remove_tree(workdir)
    except OSError as e:  # never the evaluation's end: say what is left behind
        print(f"warning: could not remove the sandbox folder {workdir}: {e}", file=sys.stderr)


def _write_source(path: Path, source: str) -> Outcome | None:
    """Write `source` as UTF-8; an Outcome for text that cannot be (a lone surrogate), else None."""
    try:
        path.write_bytes(source.encode("utf-8"))
    except UnicodeEncodeError as e:
        return Outcome("compile_error", "compile", messages=[
            f"the source is not valid Unicode text: {e.reason} at character {e.start} ({source[e.start]!r})"])
    return None


def run_rust(source: str, *, limits: Limits = Limits(), edition: str = "2021", slot: int = 0,
             test_harness: bool = False) -> Outcome:
    """Compile `source` as a binary (with `test_harness`, as `rustc --test` does) and run it in the
    sandbox; never raises for the program's sake: any failure of one sample becomes its outcome
    (SandboxUnavailable when this machine cannot isolate it and `limits` does not allow that)."""
    iso = checked_isolation(limits)
    workdir = Path(tempfile.mkdtemp(prefix="ternchat-rust-"))
    uid = BASE_UID + slot
    try:
        if (unwritable := _write_source(workdir / "main.rs", source)) is not None:
            return unwritable
        built = _rustc(workdir, ["--edition", edition, *(["--test"] if test_harness else []), "-C", "opt-level=0",
                                 "-C", "debuginfo=0", "-o", "prog", "main.rs"], limits)
        if built.outcome != "ok":
            return built
        if iso.drop_uid:
            os.chown(workdir, uid, uid)
            os.chown(workdir / "prog", uid, uid)
        wrap = _bwrap_prefix(iso.bwrap, Path(iso.sysroot), workdir, os.geteuid() == 0) if iso.namespaces else []
        run_prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] if iso.drop_uid else []
        run_cmd = (_prlimit(iso, limits.run_memory_bytes, limits.cpu_seconds, limits,
                            limits.processes if iso.drop_uid else None)
                   + wrap + run_prefix + [f"{SANDBOX_DIR}/prog" if iso.namespaces else str(workdir / "prog")]
                   + (["--test-threads=1"] if test_harness else []))  # libtest: no thread per test
        start = time.perf_counter()
        proc = _spawn(run_cmd, workdir)
        out, err, verdict = _communicate(proc, limits.run_seconds, limits.output_bytes)
        run_s = time.perf_counter() - start
        err_text = _decode(err)
        return Outcome(_classify_run(proc.returncode, err_text, verdict), "run", proc.returncode, _decode(out),
                       err_text, compile_seconds=built.compile_seconds, run_seconds=run_s)
    except SandboxUnavailable:
        raise
    except Exception as e:  # the harness's own fault, kept to this sample
        return Outcome("sandbox_error", "compile", messages=[f"{type(e).__name__}: {e}"])
    finally:
        _clean_up(workdir)


def run_many(programs: Sequence[str | Program], *, workers: int = 0, limits: Limits = Limits(),
             edition: str = "2021", progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Run many programs (sources of `edition`, or `Program`s) in a pool over the cores; results in input order."""
    checked_isolation(limits)  # refuse once, before starting any worker
    workers = workers or os.cpu_count() or 1
    free_slots = list(range(workers))
    lock = threading.Lock()

    def task(program: str | Program) -> Outcome:
        if isinstance(program, str):
            program = Program(program, edition)
        with lock:
            slot = free_slots.pop()
        try:
            return run_rust(program.source, limits=limits, edition=program.edition, slot=slot,
                            test_harness=program.test_harness)
        finally:
            with lock:
                free_slots.append(slot)
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(task, programs))


def rustc_check(source: str, args: Sequence[str], *, env: dict[str, str] | None = None,
                limits: Limits = Limits()) -> Outcome:
    """Run rustc with `args` on `source` (as `lib.rs`) in the sandbox without running anything."""
    workdir = Path(tempfile.mkdtemp(prefix="ternchat-check-"))
    try:
        if (unwritable := _write_source(workdir / "lib.rs", source)) is not None:
            return unwritable
        return _rustc(workdir, [*args, "lib.rs"], limits, env)
    finally:
        _clean_up(workdir)


def check_metadata(source: str, edition: str = "2021", limits: Limits = Limits()) -> Outcome:
    """Does `source` type-check as a standalone library crate (`--emit=metadata`)?"""
    return rustc_check(source, ["--edition", edition, "--crate-type", "lib", "--emit=metadata", "--cap-lints=allow",
                                "-o", "out.rmeta"], limits=limits)


@lru_cache(maxsize=None)
def _parse_only_flag(limits: Limits) -> str:
    for flag in ("-Zparse-crate-root-only", "-Zparse-only"):  # renamed in 2024
        if rustc_check("", [flag], env={"RUSTC_BOOTSTRAP": "1"}, limits=limits).outcome == "ok":
            return flag
    raise RustcMissing("this rustc has no parse-only mode (-Zparse-crate-root-only / -Zparse-only)")


def check_parse(source: str, edition: str = "2021", limits: Limits = Limits()) -> Outcome:
    """Does `source` parse as Rust (it may still need its crate to resolve and type-check)?"""
    return rustc_check(source, ["--edition", edition, _parse_only_flag(limits)], env={"RUSTC_BOOTSTRAP": "1"},
                       limits=limits)
