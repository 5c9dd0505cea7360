// The sandbox's supervisor: ternchat compiles this file with the host's rustc and runs it inside
// bubblewrap as `reaper REPORT_FD UID LIMITS COMMAND...`. It sets the resource limits LIMITS
// (`resource=value,...`, numbers as in <sys/resource.h>), starts COMMAND (rustc, or the program)
// under the unprivileged UID ("-": keep the current one), waits for it, and writes one line to
// REPORT_FD: how it really ended (`exited CODE` or `signaled SIGNAL`), then its CPU seconds and
// peak resident kilobytes. The harness classifies outcomes from that line, never from an exit code
// a program can choose. The reaper keeps its own uid (root, with no capability but CAP_SETUID,
// CAP_SETGID and CAP_SETPCAP when ternchat runs as root), so the program it starts can neither
// signal it nor reach REPORT_FD, which is closed on exec; a program that kills it in an
// unprivileged-mode sandbox leaves no report, which the harness scores as the program's failure.
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

#[repr(C)]
struct Rusage {
    user: [i64; 2],
    system: [i64; 2],
    max_rss_kb: i64,
    other: [i64; 13],
}

extern "C" {
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    fn setrlimit(resource: i32, limit: *const [u64; 2]) -> i32;
    fn prctl(option: i32, ...) -> i32;
}

const F_SETFD: i32 = 2;
const FD_CLOEXEC: i32 = 1;
const RUSAGE_CHILDREN: i32 = -1;
const PR_CAPBSET_DROP: i32 = 24;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: reaper REPORT_FD UID LIMITS COMMAND...");
        std::process::exit(2);
    }
    let fd: i32 = args[1].parse().expect("REPORT_FD is a number");
    unsafe {
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    let mut report = unsafe { std::fs::File::from_raw_fd(fd) };
    for item in args[3].split(',').filter(|item| !item.is_empty()) {
        let (resource, value) = item.split_once('=').expect("LIMITS is resource=value,...");
        let value: u64 = value.parse().expect("a limit is a number");
        // inherited by the command; the reaper itself uses little of any of them
        if unsafe { setrlimit(resource.parse().expect("a resource is a number"), &[value, value]) } != 0 {
            eprintln!("reaper: setrlimit {} failed", item);
            std::process::exit(2);
        }
    }
    let mut command = Command::new(&args[4]);
    command.args(&args[5..]);
    if args[2] != "-" {
        let uid: u32 = args[2].parse().expect("UID is a number");
        // empty the bounding set (needs CAP_SETPCAP), so the command cannot gain a capability by any exec
        for capability in 0..64 {
            unsafe {
                prctl(PR_CAPBSET_DROP, capability as i64, 0i64, 0i64, 0i64);
            }
        }
        command.uid(uid).gid(uid); // drops the supplementary groups too, when started as root
    }
    let line = match command.status() {
        Err(e) => format!("spawn-failed {}\n", e.raw_os_error().unwrap_or(0)),
        Ok(status) => {
            let mut usage = Rusage { user: [0; 2], system: [0; 2], max_rss_kb: 0, other: [0; 13] };
            unsafe {
                getrusage(RUSAGE_CHILDREN, &mut usage);
            }
            let seconds = (usage.user[0] + usage.system[0]) as f64;
            let cpu = seconds + (usage.user[1] + usage.system[1]) as f64 / 1e6;
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited {}", code),
                (None, Some(signal)) => format!("signaled {}", signal),
                _ => "unknown 0".to_string(),
            };
            format!("{} {:.3} {}\n", how, cpu, usage.max_rss_kb)
        }
    };
    let _ = report.write_all(line.as_bytes());
}
