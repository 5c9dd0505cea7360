"""What the rustc sandbox contains programs with, beyond bubblewrap's namespaces.

- **A seccomp filter** (`seccomp_filter`): classic BPF, built here and handed to `bwrap --seccomp`,
  so it needs no library. It checks the architecture (any other ABI, such as i386 `int 0x80` calls
  from an x86-64 process, kills the process) and returns EPERM for what neither rustc nor a test
  program needs: kernel keyrings (`add_key`, `keyctl`, `request_key`), new namespaces (`unshare`,
  `setns`, and `clone` with any CLONE_NEW* flag; `clone3` gets ENOSYS, so libc falls back to
  `clone`, whose flags a filter can read), `ptrace` and cross-process memory access, every mount
  call, `bpf`, `perf_event_open`, `userfaultfd`, io_uring, SysV shared memory, queues and semaphores
  and `memfd_create` (memory held outside the address-space limit), and module, kexec, swap, reboot
  and accounting calls.
- **Cgroups** (`Cgroups`): where this process may create cgroups (v2 with the memory and pids
  controllers delegated, or v1's memory and pids hierarchies), every run gets its own group with
  `memory.max` and `pids.max` (v1: `memory.limit_in_bytes`, swap included where accounted, and
  `pids.max`). That bounds what the address-space limit cannot see: shared memory, tmpfs pages, kernel
  memory of a million files, many processes' memory together. The group's OOM-kill counter is how
  the harness knows that the memory limit ended a program.
- **Uid leases** (`UidLease`): when ternchat runs as root, each run's processes get an unprivileged
  uid that no other run on this host holds at the same time (an exclusive `flock` per uid in a
  shared folder), so the per-uid process limit of one evaluation never counts another's programs.
- **The toolchain view** (`toolchain_view`): the directories rustc, the C compiler driver, the linker
  and the dynamic loader need (found from `cc -print-*`, `ldd` and the sysroot), bound read-only,
  instead of all of `/usr`.
- **The reaper** (`reaper.rs`, built once per rustc with the host's rustc into the user's cache):
  the supervisor inside the sandbox that starts rustc or the program under the leased uid and reports
  how it really ended.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# --- seccomp --------------------------------------------------------------------------------------------
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64 number, aarch64 number); None where the call does not exist on that architecture
DENIED_SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "add_key": (248, 217), "keyctl": (250, 219), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "shmget": (29, 194), "msgget": (68, 186), "semget": (64, 190), "memfd_create": (319, 279),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "iopl": (172, None), "ioperm": (173, None),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116), "acct": (163, 89),
    "quotactl": (179, 60), "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_CLONE_NEW_NAMESPACES = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_X32_SYSCALL_BIT = 0x40000000
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The sandbox's seccomp program as raw `struct sock_filter`s for `bwrap --seccomp`; None on an
    architecture this table does not cover."""
    machine = machine or platform.machine()
    if machine not in _AUDIT_ARCH:
        return None
    column = 0 if machine == "x86_64" else 1
    program: list[bytes] = []

    def op(code: int, k: int, jump_true: int = 0, jump_false: int = 0) -> None:
        program.append(struct.pack("=HBBI", code, jump_true, jump_false, k))

    op(_LD_ABS_W, 4)  # seccomp_data.arch
    op(_JEQ, _AUDIT_ARCH[machine], 1, 0)
    op(_RET, _KILL_PROCESS)
    op(_LD_ABS_W, 0)  # seccomp_data.nr
    if machine == "x86_64":
        op(_JGE, _X32_SYSCALL_BIT, 0, 1)
        op(_RET, _ERRNO | _EPERM)
    for numbers in DENIED_SYSCALLS.values():
        if numbers[column] is not None:
            op(_JEQ, numbers[column], 0, 1)
            op(_RET, _ERRNO | _EPERM)
    op(_JEQ, _CLONE3, 0, 1)
    op(_RET, _ERRNO | _ENOSYS)
    op(_JEQ, _CLONE[machine], 1, 0)
    op(_RET, _ALLOW)
    op(_LD_ABS_W, 16)  # low half of clone's first argument, its flags (little-endian)
    op(_JSET, _CLONE_NEW_NAMESPACES, 0, 1)
    op(_RET, _ERRNO | _EPERM)
    op(_RET, _ALLOW)
    return b"".join(program)


# --- cgroups --------------------------------------------------------------------------------------------
def _own_cgroup_dirs() -> dict[str, Path]:
    """controller ('memory', 'pids', or 'unified' for v2) -> this process's cgroup directory."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, super_options = (right.split(" ") + ["", ""])[:3]
        mountpoint = Path(left.split(" ")[4])
        if fstype == "cgroup2":
            mounts.setdefault("unified", mountpoint)
        elif fstype == "cgroup":
            for option in super_options.split(","):
                if option in ("memory", "pids"):
                    mounts.setdefault(option, mountpoint)
    found: dict[str, Path] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in (controllers.split(",") if controllers else ["unified"]):
            if name in mounts:
                found[name] = mounts[name] / path.lstrip("/")
    return found


@dataclass
class CgroupRun:
    """One run's cgroup(s): limits written, `procs` for the launcher to join, the OOM-kill count read."""

    dirs: list[Path]
    version: int
    oom_kills_before: int = 0

    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def set_limits(self, memory_bytes: int, processes: int) -> None:
        for d in self.dirs:
            values = {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": processes,
                      "memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes}
            for name, value in values.items():
                if (d / name).exists():
                    (d / name).write_text(str(value))
        self.oom_kills_before = self.oom_kills()

    def oom_kills(self) -> int:
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                if (d / name).exists():
                    match = re.search(r"^oom_kill (\d+)", (d / name).read_text(), re.M)
                    if match:
                        return int(match.group(1))
        return 0

    def memory_limit_hit(self) -> bool:
        return self.oom_kills() > self.oom_kills_before

    def close(self) -> None:
        """Kill what is left in the group(s) and remove them (a few tries: exits are asynchronous)."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    for pid in (d / "cgroup.procs").read_text().split():
                        try:
                            os.kill(int(pid), 9)
                        except ProcessLookupError:
                            pass
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


class Cgroups:
    """Where per-run cgroups can be made here; `why_not` says why not when they cannot."""

    def __init__(self) -> None:
        self.version = 0
        self.parents: list[Path] = []
        self.why_not = ""
        try:
            own = _own_cgroup_dirs()
        except OSError as e:
            self.why_not = f"cannot read this process's cgroups ({e})"
            return
        if "memory" in own and "pids" in own:
            candidates = [(1, [own["memory"], own["pids"]])]
        else:
            candidates = []
        if "unified" in own:
            candidates.append((2, [own["unified"]]))
        reasons = []
        for version, parents in candidates:
            reason = self._probe(version, parents)
            if not reason:
                self.version, self.parents = version, parents
                return
            reasons.append(f"v{version}: {reason}")
        self.why_not = "; ".join(reasons) or "no cgroup memory and pids controllers are mounted"

    @staticmethod
    def _probe(version: int, parents: list[Path]) -> str:
        needed = ("memory.max", "pids.max") if version == 2 else None
        made: list[Path] = []
        try:
            for parent in parents:
                probe = parent / f"ternchat-probe-{os.getpid()}"
                probe.mkdir()
                made.append(probe)
            files = {f.name for d in made for f in d.iterdir()}
            if needed and not set(needed) <= files:
                return "the memory and pids controllers are not delegated to this process's cgroup"
            if version == 1 and not {"memory.limit_in_bytes", "pids.max"} <= files:
                return "the v1 memory or pids controller is missing"
            return ""
        except OSError as e:
            return f"cannot create a cgroup ({e.strerror})"
        finally:
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    pass

    @property
    def active(self) -> bool:
        return self.version > 0

    def new_run(self) -> CgroupRun | None:
        if not self.active:
            return None
        name = f"ternchat-{os.getpid()}-{random.getrandbits(48):012x}"
        dirs = []
        for parent in self.parents:
            (parent / name).mkdir()
            dirs.append(parent / name)
        return CgroupRun(dirs, self.version)


# --- uid leases -----------------------------------------------------------------------------------------
BASE_UID = 61000
UID_COUNT = 2000


class UidLease:
    """An unprivileged uid that no other run on this host holds until `release`: an exclusive
    non-blocking `flock` on one file per uid in a folder every ternchat process shares."""

    def __init__(self) -> None:
        folder = Path("/run/lock/ternchat-uids") if os.access("/run/lock", os.W_OK) else \
            Path(tempfile.gettempdir()) / ".ternchat-uids"
        folder.mkdir(mode=0o700, exist_ok=True)
        for uid in random.sample(range(BASE_UID, BASE_UID + UID_COUNT), UID_COUNT):
            fd = os.open(folder / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"all {UID_COUNT} sandbox uids are leased")

    def release(self) -> None:
        os.close(self._fd)


# --- the toolchain view ---------------------------------------------------------------------------------
@dataclass
class View:
    """What the sandbox shows of the host, read-only: directories at their own paths, single files at
    chosen paths, and the symbolic links on the way to them."""

    dirs: set[str] = field(default_factory=set)
    files: dict[str, str] = field(default_factory=dict)  # path inside -> host file
    links: dict[str, str] = field(default_factory=dict)  # path inside -> link target

    def expose(self, path: str) -> None:
        """Make `path` (a directory, or a file whose directory is exposed) reachable as on the host,
        recreating each symbolic link met on the way."""
        parts = Path(os.path.abspath(path)).parts
        current = "/"
        for index, part in enumerate(parts[1:], start=2):
            step = os.path.join(current, part)
            if os.path.islink(step):
                target = os.readlink(step)
                self.links[step] = target
                self.expose(os.path.normpath(os.path.join(current, target, *parts[index:])))
                return
            current = step
        self.dirs.add(current if os.path.isdir(current) else os.path.dirname(current))

    def bwrap_args(self) -> list[str]:
        args: list[str] = []
        kept = sorted(d for d in self.dirs if not any(d.startswith(o.rstrip("/") + "/") for o in self.dirs))

        def covered(path: str) -> bool:
            return any(path == d or path.startswith(d.rstrip("/") + "/") for d in kept)

        destinations = [*kept, *self.files, *self.links]
        parents = {str(p) for d in destinations for p in Path(d).parents if str(p) != "/"}
        for parent in sorted(parents, key=lambda p: p.count("/")):
            if not covered(parent):  # bubblewrap would make it 0700, closed to the unprivileged uid
                args += ["--perms", "0755", "--dir", parent]
        for d in kept:
            args += ["--ro-bind", d, d]
        for inside, host in sorted(self.files.items()):
            args += ["--ro-bind", host, inside]
        for inside, target in sorted(self.links.items()):
            if not covered(inside):
                args += ["--symlink", target, inside]
        return args


def _shared_libraries(binary: str) -> list[str]:
    """The shared objects `binary` loads, and its interpreter (`ldd`, run on trusted binaries only)."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", out)


def _cc_file(cc: str, option: str) -> str | None:
    try:
        out = subprocess.run([cc, option], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return os.path.normpath(out) if os.path.isabs(out) and os.path.exists(out) else None


def toolchain_view(rustc: Path, sysroot: Path, rustc_inside: str, reaper: Path) -> View | str:
    """The host paths rustc, `cc` (its linker driver), `ld` and the loader need, or why not found."""
    view = View()
    cc, ld = shutil.which("cc"), shutil.which("ld")
    if cc is None or ld is None:
        return "no C linker driver `cc` or linker `ld` on PATH"
    view.files["/usr/bin/cc"] = os.path.realpath(cc)
    view.files["/usr/bin/ld"] = os.path.realpath(ld)
    if rustc_inside == str(rustc):
        view.files[rustc_inside] = os.path.realpath(rustc)
        view.expose(str(sysroot / "lib" / "rustlib"))
    binaries = [str(rustc), os.path.realpath(cc), os.path.realpath(ld), str(reaper)]
    collect2 = _cc_file(cc, "-print-prog-name=collect2")
    if collect2:
        binaries.append(collect2)
        view.expose(os.path.dirname(collect2))
    for name in ("crt1.o", "crti.o", "crtbegin.o", "libc.so", "libc_nonshared.a", "libgcc_s.so", "libgcc.a",
                 "libm.so", "libutil.a"):
        found = _cc_file(cc, f"-print-file-name={name}")
        if found:
            view.expose(found)
    for binary in binaries:
        for library in _shared_libraries(binary):
            if rustc_inside != str(rustc) and library.startswith(str(sysroot) + "/"):
                continue  # the sysroot is bound whole
            view.expose(library)
            real = library
            while os.path.islink(real):  # e.g. /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...
                real = os.path.join(os.path.dirname(real), os.readlink(real))
                view.expose(real)
    if os.path.exists("/etc/ld.so.cache"):
        view.files["/etc/ld.so.cache"] = "/etc/ld.so.cache"
    return view


def usr_view(sysroot: Path, rustc_inside: str) -> View:
    """The broad fallback: all of /usr and the top-level folders and links into it."""
    view = View(dirs={"/usr"})
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            view.links[top] = os.readlink(top)
        elif os.path.isdir(top):
            view.dirs.add(top)
    for extra in ("/etc/alternatives", "/etc/ld.so.cache"):  # `cc` is an alternatives link on Debian
        if os.path.exists(extra):
            view.dirs.add(extra) if os.path.isdir(extra) else view.files.setdefault(extra, extra)
    return view


# --- the reaper -----------------------------------------------------------------------------------------
REAPER_INSIDE = "/reaper"


def build_reaper(rustc: Path) -> Path:
    """The supervisor binary for this rustc, compiled once into the user's cache (trusted source)."""
    source = resources.files("ternchat.verify").joinpath("reaper.rs").read_bytes()
    version = subprocess.run([str(rustc), "-vV"], capture_output=True, timeout=60).stdout
    key = hashlib.sha256(source + version).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ternchat"
    binary = cache / f"sandbox-reaper-{key}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        (Path(work) / "reaper.rs").write_bytes(source)
        built = subprocess.run([str(rustc), "--edition", "2021", "-C", "opt-level=2", "-C", "panic=abort",
                                "-o", str(Path(work) / "reaper"), str(Path(work) / "reaper.rs")],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": work})
        if built.returncode != 0:
            raise RuntimeError(f"could not build the sandbox's supervisor: {built.stderr.strip()[-500:]}")
        os.chmod(Path(work) / "reaper", 0o755)
        os.replace(Path(work) / "reaper", binary)
    return binary


@dataclass(frozen=True)
class Ending:
    """How a confined process really ended, from the reaper's report (None where it left none)."""

    exit_code: int | None
    signal: int | None
    cpu_seconds: float
    max_rss_kb: int
    spawn_errno: int | None = None

    @staticmethod
    def parse(report: str) -> Ending | None:
        fields = report.split()
        try:
            if fields[:1] == ["spawn-failed"]:
                return Ending(None, None, 0.0, 0, int(fields[1]))
            how, number, cpu, rss = fields[0], int(fields[1]), float(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            return None
        if how == "exited":
            return Ending(number, None, cpu, rss)
        if how == "signaled":
            return Ending(None, number, cpu, rss)
        return None
