"""Compile and run untrusted Rust with the real `rustc`, contained.

Each program gets a fresh temporary folder and is compiled with `rustc --error-format=json`
(diagnostics parsed into error codes), then run with stdin closed, a scrubbed environment, wall-
clock limits for both phases, resource limits (CPU seconds, address space, file size, processes,
open files, no core dumps) and bounded captured output. Where bubblewrap (`bwrap`) works, both
phases run in new mount, PID, network, IPC, UTS and cgroup namespaces, under the seccomp filter of
`containment.py`, seeing only the toolchain's own folders (read-only) and the sandbox folder: no
network, no host files (neither `include_str!("/etc/shadow")` at compile time nor `~/.ssh` at run
time), every process dies with the sandbox, and bwrap's command line (read from a pipe) shows no
host path. At compile time the sandbox folder is the run's temporary folder; at run time it is a
size-limited tmpfs holding only the binary, so a program's disk writes vanish with it. When ternchat
runs as root, rustc, the linker and the program all run under an unprivileged uid leased for this
run alone, with no capabilities; otherwise in a user namespace that may not create another. Where
cgroups can be made, each run also gets memory and process limits that cover shared memory, tmpfs
and kernel memory. `isolation()` reports which mechanisms are active.

Every outcome gets one class, taken from facts: the reaper inside the sandbox reports the real
wait status (exit code or signal) and CPU time, the cgroup its OOM kills, the harness what it
killed itself (wall clock, output size). A failure of rustc caused by the program (too big, too
slow, out of memory, too many diagnostics) is a `compile_error` with the reason; `sandbox_error`
is kept for faults of the harness or machine. No program can end an evaluation: any failure of
one sample becomes its outcome, and its folder is removed iteratively (`remove_tree`).

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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from ternchat.verify.containment import (REAPER_INSIDE, Cgroups, CgroupRun, Ending, UidLease, View, build_reaper,
                                         seccomp_filter, toolchain_view, usr_view)

OUTCOMES = ("ok", "compile_error", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
SANDBOX_DIR = "/sandbox"
TOOLCHAIN_DIR = "/toolchain"  # where a sysroot outside /usr (rustup's) is bound
_ALLOC_FAILED = re.compile(r"^memory allocation of \d+ bytes failed$", re.M)  # Rust's report, then abort()
_SANDBOX_PROCESSES = 3  # bwrap, its pid-1 and the reaper: in the run's cgroup, beside the program's
_RLIMIT = {"cpu": 0, "fsize": 1, "core": 4, "nproc": 6, "nofile": 7, "as": 9}  # <sys/resource.h>
# joins the run's cgroup(s) before anything else starts, then becomes the sandbox
_JOIN_CGROUPS = 'for f in "$@"; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@"'


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
    scratch_bytes: int = 64 << 20  # each writable tmpfs: /tmp, and /sandbox at run time
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
    messages: list[str] = field(default_factory=list)  # rustc's errors, or why the class was given
    rendered: dict[str, str] = field(default_factory=dict)  # error code -> rustc's full text of its first error
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    signal: int | None = None  # the signal that ended the process, from its wait status

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    rustc: str
    sysroot: str
    bwrap: str  # its path where the namespaces work, else ''
    namespaces: bool  # bubblewrap: private filesystem view, no network, own PID space
    drop_uid: bool  # rustc and the program run under an unprivileged uid leased per run
    reaper: str = ""  # the supervisor binary (containment.build_reaper)
    seccomp: bool = False
    cgroups: str = ""  # 'v1' or 'v2' where every run gets its own memory and pids limits, else ''
    view: str = ""  # what the sandbox shows of the host
    view_args: tuple[str, ...] = ()
    why_not_isolated: str = ""  # what the namespace probe found, when namespaces are off
    why_no_cgroups: str = ""

    @property
    def rustc_inside(self) -> str:
        if self.namespaces and not self.sysroot.startswith("/usr/"):
            return f"{TOOLCHAIN_DIR}/bin/rustc"
        return self.rustc

    @property
    def network(self) -> str:
        return "none (own network namespace)" if self.namespaces else "host network (no bwrap)"

    @property
    def filesystem(self) -> str:
        return self.view if self.namespaces else "host (no bwrap)"

    def describe(self) -> str:
        uid = ("rustc, linker and program under an unprivileged uid leased per run, no capabilities"
               if self.drop_uid else "the invoking user" + (" in a user namespace that cannot nest another"
                                                             if self.namespaces else ""))
        cgroup = (f"cgroup {self.cgroups} memory and pids limits per run" if self.cgroups
                  else f"no per-run cgroup ({self.why_no_cgroups})")
        seccomp = ("seccomp filter (keyrings, namespaces, ptrace, mounts, bpf, perf, userfaultfd, SysV IPC, memfd)"
                   if self.seccomp else "no seccomp filter")
        return (f"rustc {self.rustc}; filesystem: {self.filesystem}; network: {self.network}; uid: {uid}; "
                f"{seccomp}; {cgroup}; rlimits: CPU, address space, file size, processes, open files, core; "
                f"writable: {'size-limited tmpfs (/sandbox at run time, /tmp)' if self.namespaces else 'host folder'}; "
                "exit status from the reaper's wait; scrubbed env, stdin closed, wall-clock limits")


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


@lru_cache(maxsize=1)
def _cgroups() -> Cgroups:
    return Cgroups()


@lru_cache(maxsize=1)
def _seccomp_program() -> bytes | None:
    return seccomp_filter()


def _probe(iso: Isolation) -> str:
    """'' when a hello-world compiles and runs in the sandbox `iso` describes, else what failed."""
    outcome = run_rust('fn main() { print!("ok"); }', limits=Limits(allow_unisolated=True), isolation_=iso)
    if outcome.outcome == "ok" and outcome.stdout == "ok":
        return ""
    detail = (outcome.stderr.strip().splitlines() or outcome.messages or [outcome.outcome])[-1]
    return f"{iso.bwrap} cannot build the sandbox here ({detail}); user namespaces may be disabled"


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Find rustc, build the reaper and probe which isolation mechanisms work on this machine (cached):
    the sandbox with only the toolchain's folders, else with all of /usr, else no namespaces."""
    rustc = _rustc_path()
    sysroot = rustc.parent.parent
    try:
        reaper = build_reaper(rustc)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        raise RustcMissing(f"rustc cannot build a plain program here: {e}") from None
    bwrap = shutil.which("bwrap")  # resolved here: the sandbox's own processes get a minimal PATH
    cgroups = _cgroups()
    base = Isolation(str(rustc), str(sysroot), "", False, os.geteuid() == 0, str(reaper),
                     cgroups=f"v{cgroups.version}" if cgroups.active else "", why_no_cgroups=cgroups.why_not)
    if bwrap is None:
        return Isolation(**{**asdict(base), "why_not_isolated": "bubblewrap (bwrap) is not installed"})
    inside = f"{TOOLCHAIN_DIR}/bin/rustc" if not str(sysroot).startswith("/usr/") else str(rustc)
    views: list[tuple[str, View | str]] = [
        ("toolchain folders only, read-only, + the sandbox folder", toolchain_view(rustc, sysroot, inside, reaper)),
        ("all of /usr read-only (the toolchain-only view failed: {why}) + the sandbox folder",
         usr_view(sysroot, inside))]
    why = ""
    for description, view in views:
        if isinstance(view, str):
            why = view
            continue
        candidate = Isolation(**{**asdict(base), "bwrap": bwrap, "namespaces": True,
                                 "seccomp": _seccomp_program() is not None, "view": description.format(why=why),
                                 "view_args": tuple(view.bwrap_args())})
        why = _probe(candidate)
        if not why:
            return candidate
    return Isolation(**{**asdict(base), "why_not_isolated": why})


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


@dataclass
class _Confinement:
    """One sample's share of the host: its leased uid (as root) and its cgroup (where cgroups work)."""

    iso: Isolation
    folder: Path  # the sample's private temporary folder (mode 0700), which holds `workdir`
    limits: Limits
    lease: UidLease | None = None
    cgroup: CgroupRun | None = None

    @property
    def workdir(self) -> Path:
        return self.folder / "sandbox"

    def __enter__(self) -> _Confinement:
        # searchable by all (the reaper holds no capability to pass its owner's mode), hidden by `folder`
        self.workdir.mkdir(mode=0o711)
        if not self.iso.namespaces:  # the leased uid runs the program from its host path
            self.folder.chmod(0o711)
        if self.iso.drop_uid:
            self.lease = UidLease()
            os.chown(self.workdir, self.lease.uid, self.lease.uid)
        if self.iso.cgroups:
            self.cgroup = _cgroups().new_run()
        return self

    def __exit__(self, *exc) -> None:
        if self.cgroup is not None:
            self.cgroup.close()
        if self.lease is not None:
            self.lease.release()

    def give(self, path: Path) -> None:
        """Hand a file of the folder to the run's uid."""
        if self.lease is not None:
            os.chown(path, self.lease.uid, self.lease.uid)

    def _bwrap_args(self, phase: str, env: dict[str, str], seccomp_fd: int | None) -> list[str]:
        iso, limits = self.iso, self.limits
        args = ["--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try"]
        if os.geteuid() == 0:  # the reaper keeps only what it needs to drop to the leased uid
            args += ["--cap-drop", "ALL"]
            for capability in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
                args += ["--cap-add", capability]
        else:
            args += ["--unshare-user", "--disable-userns"]
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        args += list(iso.view_args)
        if iso.rustc_inside != iso.rustc:
            args += ["--ro-bind", iso.sysroot, TOOLCHAIN_DIR]
        args += ["--ro-bind", iso.reaper, REAPER_INSIDE, "--proc", "/proc", "--dev", "/dev",
                 "--remount-ro", "/dev",  # no /dev/shm: an unbounded tmpfs in a user namespace
                 "--perms", "1777", "--size", str(limits.scratch_bytes), "--tmpfs", "/tmp"]
        if phase == "compile":
            args += ["--bind", str(self.workdir), SANDBOX_DIR]
        else:
            args += ["--perms", "1777", "--size", str(limits.scratch_bytes), "--tmpfs", SANDBOX_DIR,
                     "--ro-bind", str(self.workdir / "prog"), f"{SANDBOX_DIR}/prog"]
        args += ["--chdir", SANDBOX_DIR, "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME",
                 SANDBOX_DIR, "--setenv", "TMPDIR", "/tmp"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        return args

    def spawn(self, phase: str, command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
        """Start `command` in the sandbox under the reaper; returns the process and the report's read end."""
        iso, limits = self.iso, self.limits
        memory = limits.compile_memory_bytes if phase == "compile" else limits.run_memory_bytes
        cpu = int(limits.compile_seconds) + 5 if phase == "compile" else limits.cpu_seconds
        rlimits = {"as": memory, "cpu": cpu, "fsize": limits.file_bytes, "nofile": 256, "core": 0}
        # without bwrap the toolchain stays at host paths the leased uid may not reach (a home folder):
        # then only the program drops to it
        drop = self.lease is not None and (iso.namespaces or phase == "run")
        if drop:  # a per-uid count: only meaningful for a uid of this run alone
            rlimits["nproc"] = limits.processes
        if self.cgroup is not None:
            self.cgroup.set_limits(memory, limits.processes + _SANDBOX_PROCESSES)
        report_read, report_write = os.pipe()
        keep = [report_write]
        uid = str(self.lease.uid) if drop else "-"
        reaper_args = [str(report_write), uid, ",".join(f"{_RLIMIT[k]}={v}" for k, v in rlimits.items()), *command]
        path = "/usr/bin:/bin"
        if iso.namespaces:
            seccomp = _seccomp_program()
            seccomp_fd = _pipe_holding(seccomp) if seccomp is not None else None
            args = self._bwrap_args(phase, env or {}, seccomp_fd)
            args_fd = _pipe_holding(b"".join(a.encode() + b"\0" for a in args))
            keep += [args_fd] + ([seccomp_fd] if seccomp_fd is not None else [])
            # the host paths stay in the pipe: the command line shows only paths inside the sandbox
            cmd = ["bwrap", "--args", str(args_fd), "--", REAPER_INSIDE, *reaper_args]
            path = f"{os.path.dirname(iso.bwrap)}:{path}"
        else:
            cmd = [iso.reaper, *reaper_args]
        if self.cgroup is not None:
            cmd = ["/bin/sh", "-c", _JOIN_CGROUPS, "ternchat-cgroup", *self.cgroup.procs(), "--", *cmd]
        try:
            proc = subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=keep,
                                    env={"PATH": path, "HOME": str(self.workdir), "LANG": "C.UTF-8", **(env or {})},
                                    executable=iso.bwrap if cmd[0] == "bwrap" else None)
        finally:
            for fd in keep:
                os.close(fd)
        return proc, report_read


def _pipe_holding(data: bytes) -> int:
    """The read end of a pipe that holds `data` and is closed for writing (data under 64 KiB)."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return read


def _read_report(fd: int, wait_seconds: float = 5.0) -> Ending | None:
    """The reaper's report, once every copy of the pipe's write end is closed (the sandbox's
    processes die with bwrap, a moment after it); None if it left none."""
    data = b""
    deadline = time.monotonic() + wait_seconds
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(timeout=left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(fd)
    return Ending.parse(data.decode("ascii", errors="replace"))


def _communicate(proc: subprocess.Popen, timeout: float, max_output: int) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until exit; returns (stdout, stderr, '' | 'timeout' | 'output_limit'), the
    verdict being what the harness itself ended the process for."""
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


def parse_diagnostics(stderr: str) -> tuple[list[str], list[str], dict[str, str]]:
    """Error codes (E0308, ...) and messages of rustc's JSON diagnostics, errors only, and rustc's rendered
    text (message, source span, notes) of the first error of each code."""
    codes, messages, rendered = [], [], {}
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
            rendered.setdefault(codes[-1], diag.get("rendered") or message)
    return codes, messages, rendered


def _decode(data: bytes, limit: int | None = 20_000) -> str:
    """The text of a stream, cut to `limit` bytes (what an Outcome keeps); None keeps it whole."""
    return data[:limit].decode("utf-8", errors="replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _used_cpu_limit(ending: Ending, cpu_seconds: float) -> bool:
    """Killed by the CPU-time limit: SIGXCPU, or SIGKILL once its CPU time reached the limit."""
    return ending.signal == signal.SIGXCPU or (ending.signal == signal.SIGKILL
                                               and ending.cpu_seconds >= cpu_seconds - 0.05)


def _classify_run(ending: Ending | None, verdict: str, memory_limit_hit: bool, stdout: str, stderr: str,
                  proof: EndOfTests | None, iso: Isolation, limits: Limits) -> tuple[str, str]:
    """(outcome, why) of a run, from what the harness killed, the cgroup's OOM kills and the reaper's report."""
    if verdict == "timeout":
        return "timeout", f"still running after {limits.run_seconds:g} s of wall-clock time"
    if verdict == "output_limit":
        return "output_limit", f"wrote more than {limits.output_bytes} bytes to stdout and stderr"
    if memory_limit_hit:
        return "memory_limit", f"the cgroup's {limits.run_memory_bytes >> 20} MiB memory limit killed it"
    if ending is None:  # the reaper left no report
        if iso.drop_uid or not iso.namespaces:
            return "sandbox_error", "the sandbox's supervisor left no report"
        return "runtime_error", "the sandbox's supervisor left no report: the program killed it"
    if ending.spawn_errno is not None:
        return "sandbox_error", f"the program could not be started ({os.strerror(ending.spawn_errno)})"
    if ending.signal is not None:
        if _used_cpu_limit(ending, limits.cpu_seconds):
            return "timeout", f"used its {limits.cpu_seconds} s of CPU time"
        if ending.signal == signal.SIGXFSZ:
            return "output_limit", f"wrote a file past the {limits.file_bytes >> 20} MiB file-size limit"
        if ending.signal == signal.SIGABRT and _ALLOC_FAILED.search(stderr):
            return "memory_limit", "aborted when the address-space limit refused an allocation"
        return "runtime_error", f"killed by {_signal_name(ending.signal)}"
    if ending.exit_code != 0:
        return "runtime_error", f"exit status {ending.exit_code}"
    if proof is not None and proof.line not in stdout.splitlines():
        return "runtime_error", "exited 0 before its tests finished (the end-of-tests line is missing)"
    if proof is not None and proof.summary not in stdout:
        return "runtime_error", f"the test binary did not report `{proof.summary}`"
    return "ok", ""


@dataclass(frozen=True)
class EndOfTests:
    """Proof that a program's tests ran to their end. `files` (name, text) are written beside the
    source for the compile only; the run passes only when it exits 0 and prints `line` on a line of
    its own. The source must print `line` after its last test, made from the files at compile time."""

    files: tuple[tuple[str, str], ...]
    line: str
    summary: str = ""  # also required in stdout (libtest's count of the tests that passed)


@dataclass(frozen=True)
class Program:
    """A Rust program to compile and run: a binary with `main`, or with `test_harness` a crate of
    `#[test]` functions compiled with `rustc --test`, which passes when every test passes. `args` go to
    the binary (libtest's test names and options); `proof`, where given, must be shown for a pass."""

    source: str
    edition: str = "2021"
    test_harness: bool = False
    args: tuple[str, ...] = ()
    proof: EndOfTests | None = None


def _rustc(box: _Confinement, args: Sequence[str], env: dict[str, str] | None = None) -> Outcome:
    """Run rustc with `args` in the sandbox folder; outcome 'ok' or the class of its failure with the reason."""
    iso, limits = box.iso, box.limits
    start = time.perf_counter()
    proc, report = box.spawn("compile", [iso.rustc_inside, *args, "--error-format=json"], env)
    _, err, verdict = _communicate(proc, limits.compile_seconds, limits.output_bytes * 8)
    ending = _read_report(report)
    seconds = time.perf_counter() - start
    oom = box.cgroup is not None and box.cgroup.memory_limit_hit()

    def failed(outcome: str, why: str, **extra) -> Outcome:
        return Outcome(outcome, "compile", proc.returncode, messages=[why], compile_seconds=seconds,
                       signal=ending.signal if ending else None, **extra)

    if verdict == "timeout":
        return failed("compile_error", f"rustc did not finish within {limits.compile_seconds:g} s")
    if verdict == "output_limit":
        return failed("compile_error", f"rustc's diagnostics passed {limits.output_bytes * 8} bytes")
    if oom:
        return failed("compile_error", f"rustc ran out of memory (the {limits.compile_memory_bytes >> 20} MiB limit)")
    if ending is None or ending.spawn_errno is not None:  # bwrap or the reaper failed: not the program's fault
        return failed("sandbox_error", "the sandbox could not run rustc", stderr=_decode(err))
    text = err.decode("utf-8", errors="replace")
    if ending.signal is not None:
        if _used_cpu_limit(ending, limits.compile_seconds):
            return failed("compile_error", "rustc used its CPU-time limit")
        if ending.signal == signal.SIGXFSZ:
            return failed("compile_error", f"an output file passed the {limits.file_bytes >> 20} MiB file-size limit")
        if ending.signal == signal.SIGABRT and _ALLOC_FAILED.search(text):
            return failed("compile_error", f"rustc ran out of memory (the {limits.compile_memory_bytes >> 20} MiB "
                                           "address-space limit)")
        return failed("compile_error", f"rustc was killed by {_signal_name(ending.signal)}", stderr=_decode(err))
    if ending.exit_code == 0:
        return Outcome("ok", "compile", 0, compile_seconds=seconds)
    codes, messages, rendered = parse_diagnostics(text)
    if not messages:  # an internal compiler error, or rustc stopped some other way: keep what it said
        return failed("compile_error", f"rustc failed with exit status {ending.exit_code} and no diagnostic",
                      stderr=_decode(err))
    return Outcome("compile_error", "compile", ending.exit_code, error_codes=codes, messages=messages,
                   rendered=rendered, compile_seconds=seconds)


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


def _write_files(box: _Confinement, files: Sequence[tuple[str, str]]) -> Outcome | None:
    """Write the sample's files into its folder as UTF-8; an Outcome for text that cannot be (a lone
    surrogate), else None."""
    for name, text in files:
        try:
            (box.workdir / name).write_bytes(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            return Outcome("compile_error", "compile", messages=[
                f"the source is not valid Unicode text: {e.reason} at character {e.start} ({text[e.start]!r})"])
        box.give(box.workdir / name)
    return None


def run_rust(source: str, *, limits: Limits = Limits(), edition: str = "2021", test_harness: bool = False,
             args: Sequence[str] = (), proof: EndOfTests | None = None, isolation_: Isolation | None = None) -> Outcome:
    """Compile `source` as a binary (with `test_harness`, as `rustc --test` does) and run it with `args`
    in the sandbox; with `proof`, it passes only by showing it. Never raises for the program's sake:
    any failure of one sample becomes its outcome (SandboxUnavailable when this machine cannot isolate
    it and `limits` does not allow that). `isolation_` is for probing a candidate sandbox."""
    iso = isolation_ or checked_isolation(limits)
    folder = Path(tempfile.mkdtemp(prefix="ternchat-rust-"))
    try:
        with _Confinement(iso, folder, limits) as box:
            files = [("main.rs", source), *(proof.files if proof else ())]
            if (unwritable := _write_files(box, files)) is not None:
                return unwritable
            built = _rustc(box, ["--edition", edition, *(["--test"] if test_harness else []), "-C", "opt-level=0",
                                 "-C", "debuginfo=0", "-o", "prog", "main.rs"])
            if built.outcome != "ok":
                return built
            for name, _ in proof.files if proof else ():
                os.unlink(box.workdir / name)  # outside bwrap the program would see its folder
            program = f"{SANDBOX_DIR}/prog" if iso.namespaces else str(box.workdir / "prog")
            start = time.perf_counter()
            libtest = ["--test-threads=1"] if test_harness else []  # no thread per test
            proc, report = box.spawn("run", [program, *libtest, *args])
            out, err, verdict = _communicate(proc, limits.run_seconds, limits.output_bytes)
            ending = _read_report(report)
            run_s = time.perf_counter() - start
            memory_hit = box.cgroup is not None and box.cgroup.memory_limit_hit()
            stdout, stderr = _decode(out), _decode(err)
            # classified on the whole output: the proof comes last, after whatever the program printed
            outcome, why = _classify_run(ending, verdict, memory_hit, _decode(out, limit=None), stderr, proof, iso,
                                         limits)
            return Outcome(outcome, "run", ending.exit_code if ending else proc.returncode, stdout, stderr,
                           messages=[why] if why else [], compile_seconds=built.compile_seconds, run_seconds=run_s,
                           signal=ending.signal if ending else None)
    except SandboxUnavailable:
        raise
    except Exception as e:  # the harness's own fault, kept to this sample
        return Outcome("sandbox_error", "compile", messages=[f"{type(e).__name__}: {e}"])
    finally:
        _clean_up(folder)


def run_many(programs: Sequence[str | Program], *, workers: int = 0, limits: Limits = Limits(),
             edition: str = "2021", progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Run many programs (sources of `edition`, or `Program`s) in a pool over the cores; results in input order."""
    checked_isolation(limits)  # refuse once, before starting any worker
    workers = workers or os.cpu_count() or 1

    def task(program: str | Program) -> Outcome:
        if isinstance(program, str):
            program = Program(program, edition)
        try:
            return run_rust(program.source, limits=limits, edition=program.edition,
                            test_harness=program.test_harness, args=program.args, proof=program.proof)
        finally:
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(task, programs))


def rustc_check(source: str, args: Sequence[str], *, env: dict[str, str] | None = None,
                limits: Limits = Limits()) -> Outcome:
    """Run rustc with `args` on `source` (as `lib.rs`) in the sandbox without running anything."""
    iso = checked_isolation(limits)
    folder = Path(tempfile.mkdtemp(prefix="ternchat-check-"))
    try:
        with _Confinement(iso, folder, limits) as box:
            if (unwritable := _write_files(box, [("lib.rs", source)])) is not None:
                return unwritable
            return _rustc(box, [*args, "lib.rs"], env)
    finally:
        _clean_up(folder)


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
