"""Hostile programs against the sandbox's containment, on the real rustc and bubblewrap: memory held
outside the address space, disk floods, keyrings, nested namespaces, the compiler's own credentials,
early exits and shadowed asserts that would fake a pass, exit codes that would fake a class, and
evaluations running side by side."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from ternchat.verify.humaneval import checked_program, load_problems, score
from ternchat.verify.sandbox import Limits, isolation, run_rust

pytestmark = pytest.mark.usefixtures("sandbox_ready")

FAST = Limits(run_seconds=8, cpu_seconds=4, compile_seconds=60)
LIBC = 'extern "C" { fn __errno_location() -> *mut i32; }\nfn errno() -> i32 { unsafe { *__errno_location() } }\n'


def run(body: str, limits: Limits = FAST, prelude: str = LIBC):
    return run_rust(prelude + textwrap.dedent(body), limits=limits)


def test_sysv_and_posix_shared_memory_and_memfd_are_refused():
    outcome = run("""
        extern "C" {
            fn shmget(key: i32, size: usize, flags: i32) -> i32;
            fn memfd_create(name: *const u8, flags: u32) -> i32;
        }
        fn main() {
            let shm = unsafe { shmget(0, 256 << 20, 0o1000 | 0o600) };  // IPC_PRIVATE, IPC_CREAT
            println!("shmget {} errno {}", shm, errno());
            let memfd = unsafe { memfd_create(b"x\\0".as_ptr(), 0) };
            println!("memfd {} errno {}", memfd, errno());
            println!("dev/shm {}", std::fs::write("/dev/shm/held", vec![1u8; 1 << 20]).is_ok());
        }""")
    assert outcome.outcome == "ok", outcome
    assert "shmget -1 errno 1" in outcome.stdout and "memfd -1 errno 1" in outcome.stdout
    assert "dev/shm false" in outcome.stdout


def test_no_new_namespaces_so_no_private_tmpfs_to_fill():
    outcome = run("""
        extern "C" { fn unshare(flags: i32) -> i32; }
        fn main() {
            for (name, flags) in [("user", 0x10000000), ("mount", 0x20000), ("user+mount", 0x10020000)] {
                let r = unsafe { unshare(flags) };
                println!("{} {} {}", name, r, errno());
            }
        }""")
    assert outcome.outcome == "ok", outcome
    assert outcome.stdout.split("\n")[:3] == ["user -1 1", "mount -1 1", "user+mount -1 1"]


def test_memory_held_by_many_processes_together_is_stopped_by_the_cgroup():
    if not isolation().cgroups:
        pytest.skip(f"no per-run cgroups here: {isolation().why_no_cgroups}")
    limits = Limits(run_seconds=20, cpu_seconds=10, run_memory_bytes=256 << 20)
    outcome = run("""
        fn main() {
            if std::env::args().count() > 1 {  // a child: hold 100 MiB, touched, for a while
                let v = vec![7u8; 100 << 20];
                std::thread::sleep(std::time::Duration::from_secs(5));
                println!("{}", v[v.len() - 1]);
                return;
            }
            let kids: Vec<_> = (0..4).map(|_| std::process::Command::new("/proc/self/exe").arg("child")
                .spawn().unwrap()).collect();
            for mut k in kids { k.wait().unwrap(); }
        }""", limits)
    assert outcome.outcome == "memory_limit", outcome
    assert "cgroup" in outcome.messages[0]


def test_a_disk_flood_stops_at_the_tmpfs_size_and_leaves_nothing_on_the_host():
    limits = Limits(run_seconds=20, cpu_seconds=10, scratch_bytes=32 << 20)
    outcome = run("""
        fn main() {
            let chunk = vec![7u8; 15 << 20];
            let mut written = 0usize;
            for i in 0..100 {
                match std::fs::write(format!("f{}", i), &chunk) { Ok(()) => written += chunk.len(), Err(_) => break }
            }
            print!("{}", written);
        }""", limits)
    assert outcome.outcome == "ok", outcome
    assert int(outcome.stdout) <= 32 << 20


def test_kernel_keyrings_are_out_of_reach():
    outcome = run("""
        extern "C" { fn syscall(n: i64, ...) -> i64; }
        fn main() {
            // add_key("user", "ternchat", "secret", 6, KEY_SPEC_USER_KEYRING)
            let r = unsafe { syscall(248, b"user\\0".as_ptr(), b"ternchat\\0".as_ptr(), b"secret".as_ptr(), 6usize,
                                     -4i32) };
            // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0)
            let k = unsafe { syscall(250, 0i32, -4i32, 0i32) };
            println!("add_key {} {} keyctl {} {}", r, errno(), k, errno());
        }""")
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall numbers in this program are x86-64's")
    assert outcome.outcome == "ok", outcome
    assert outcome.stdout.strip() == "add_key -1 1 keyctl -1 1"


def test_rustc_itself_runs_unprivileged_under_the_filter():
    outcome = run_rust('const S: &str = include_str!("/proc/self/status");\n'
                       'fn main() { for l in S.lines() { println!("{}", l); } }', limits=FAST)
    assert outcome.outcome == "ok", outcome
    status = dict(line.split(":", 1) for line in outcome.stdout.splitlines() if ":" in line)
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    if os.geteuid() == 0:
        assert all(int(uid) >= 61000 for uid in status["Uid"].split())


def test_only_the_toolchain_is_visible_and_no_host_path_in_pid_1s_command_line():
    outcome = run("""
        fn main() {
            for p in ["/bin/sh", "/usr/bin/python3", "/usr/share", "/etc/passwd", "/home", "/root"] {
                println!("{} {}", p, std::path::Path::new(p).exists());
            }
            println!("{}", std::fs::read_to_string("/proc/1/cmdline").unwrap().replace('\\0', " "));
        }""", prelude="")
    assert outcome.outcome == "ok", outcome
    lines = outcome.stdout.splitlines()
    assert all(line.endswith(" false") for line in lines[:6]), lines
    if "toolchain folders only" in isolation().view:
        assert "/tmp" not in lines[6] and "ternchat-rust" not in lines[6] and os.path.expanduser("~") not in lines[6]


def test_concurrent_evaluations_do_not_share_process_limits(tmp_path):
    """One evaluation's program holds 30 threads; a second evaluation in another process runs a program
    that needs 8. With a shared uid the second would fail to spawn threads (32 processes per uid)."""
    hog = tmp_path / "hog.py"
    hog.write_text("from ternchat.verify.sandbox import Limits, run_rust\n"
                   "o = run_rust('fn main() { let t: Vec<_> = (0..30).map(|_| std::thread::spawn(|| "
                   "std::thread::sleep(std::time::Duration::from_secs(6)))).collect(); "
                   "for h in t { h.join().unwrap(); } println!(\"held\"); }', "
                   "limits=Limits(run_seconds=20, cpu_seconds=10))\nprint(o.outcome, o.stdout.strip())\n")
    holder = subprocess.Popen([sys.executable, str(hog)], stdout=subprocess.PIPE, text=True)
    time.sleep(3)  # the hog is compiled and holding its threads
    outcome = run_rust("fn main() { let t: Vec<_> = (0..8).map(|i| std::thread::spawn(move || i)).collect(); "
                       "println!(\"{}\", t.into_iter().map(|h| h.join().unwrap()).sum::<i32>()); }", limits=FAST)
    assert outcome.outcome == "ok" and outcome.stdout == "28\n", outcome
    assert holder.wait(timeout=60) == 0 and holder.stdout.read().strip() == "ok held"


# --- a pass must be earned ----------------------------------------------------------------------------
FAKE_PASSES = {
    "exit_0_early": "    std::process::exit(0)",
    "raw_exit_group": ("    unsafe { std::arch::asm!(\"syscall\", in(\"rax\") 231, in(\"rdi\") 0, "
                       "options(noreturn)) }"),
    "init_array_constructor": ("    0\n}\n#[used]\n#[link_section = \".init_array\"]\n"
                               "static EXIT_FIRST: extern \"C\" fn() = { extern \"C\" fn f() { "
                               "std::process::exit(0) } f };\nfn unused() -> i64 {\n    0"),
    "shadowed_assert_eq": ("    0\n}\nmacro_rules! assert_eq { ($($t:tt)*) => {} }\n"
                           "macro_rules! assert { ($($t:tt)*) => {} }\nfn unused() -> i64 {\n    0"),
}


@pytest.mark.parametrize("name", list(FAKE_PASSES))
def test_a_completion_cannot_fake_a_pass(name):
    if name == "raw_exit_group" and os.uname().machine != "x86_64":
        pytest.skip("x86-64 assembly")
    problem = next(p for p in load_problems() if p.name == "tc_0_sum_of_squares")
    outcome = score([problem], {problem.name: [FAKE_PASSES[name]]}, cut=False, limits=FAST)[problem.name][0]
    assert outcome.outcome != "ok", outcome
    assert score([problem], {problem.name: [problem.reference]}, limits=FAST)[problem.name][0].outcome == "ok"


def test_a_shadowed_prelude_type_does_not_pass():
    """A completion's own `String` whose values all compare equal would satisfy `assert_eq!` on any
    answer; the tests' explicit prelude import makes the name ambiguous instead."""
    problem = next(p for p in load_problems() if p.name == "tc_1_reverse_words")
    fake_string = ("    String\n}\n#[derive(Debug, PartialEq)]\nstruct String;\n"
                   "impl String { fn from(_: &str) -> String { String } }\nfn unused() {")
    outcome = score([problem], {problem.name: [fake_string]}, cut=False, limits=FAST)[problem.name][0]
    assert outcome.outcome == "compile_error" and "E0659" in outcome.error_codes, outcome


def test_a_test_module_completion_cannot_skip_or_end_the_tests():
    problem = load_problems(os.path.join(os.path.dirname(__file__), "fixtures", "humaneval_test_module.jsonl"))[0]
    program = checked_program(problem, problem.reference, cut=False)
    assert "--exact" in program.args and program.proof is not None
    wrong_and_exit = ("    unimplemented!()\n}\n#[test]\nfn " + "z" * 60 + "() { std::process::exit(0) }\n"
                      "#[test]\nfn a() { std::process::exit(0) }\nfn unused() {\n")
    outcome = score([problem], {problem.name: [wrong_and_exit]}, cut=False, limits=FAST)[problem.name][0]
    assert outcome.outcome != "ok", outcome


# --- classes from facts --------------------------------------------------------------------------------
@pytest.mark.parametrize("body, outcome, why", [
    ("fn main() { std::process::exit(137) }", "runtime_error", "exit status 137"),
    ("fn main() { std::process::exit(152) }", "runtime_error", "exit status 152"),
    ("fn main() { std::process::exit(153) }", "runtime_error", "exit status 153"),
    ('extern "C" { fn kill(p: i32, s: i32) -> i32; fn getpid() -> i32; }\n'
     "fn main() { unsafe { kill(getpid(), 9); } }", "runtime_error", "SIGKILL"),
    ('fn main() { panic!("memory allocation of 5 bytes failed") }', "runtime_error", "exit status 101"),
    ("fn main() { let v = vec![1u8; 10_000_000_000]; println!(\"{}\", v[v.len() - 1]); }", "memory_limit",
     "address-space limit"),
    ("fn main() { loop { std::hint::black_box(0); } }", "timeout", "CPU time"),
])
def test_the_class_comes_from_how_the_program_really_ended(body, outcome, why):
    result = run_rust(body, limits=Limits(run_seconds=20, cpu_seconds=2, compile_seconds=60))
    assert result.outcome == outcome and why in result.messages[0], result


def test_making_rustc_fail_is_a_compile_error_with_the_reason():
    too_big = run_rust("static BIG: [u8; 40_000_000] = [1; 40_000_000];\n"
                       "fn main() { println!(\"{}\", BIG[std::hint::black_box(7)]); }",
                       limits=Limits(compile_seconds=120, file_bytes=16 << 20))
    assert too_big.outcome == "compile_error" and "file-size limit" in too_big.messages[0], too_big
    chatty = run_rust("fn main() {\n" + '    let _x: u32 = "text";\n' * 200 + "}\n",
                      limits=Limits(output_bytes=4096, compile_seconds=60))
    assert chatty.outcome == "compile_error" and "diagnostics passed" in chatty.messages[0], chatty
    slow = run_rust("fn main() {}", limits=Limits(compile_seconds=0.01))
    assert slow.outcome == "compile_error" and "did not finish" in slow.messages[0], slow


def test_the_report_names_every_active_mechanism():
    iso = isolation()
    text = iso.describe()
    assert "seccomp filter" in text and "tmpfs" in text and "unprivileged uid" in text or os.geteuid() != 0
    assert ("cgroup v" in text) == bool(iso.cgroups) and (iso.why_no_cgroups in text or iso.cgroups)
