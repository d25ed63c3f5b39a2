//! The one place that runs child processes (qemu-img, lvm tools).
//!
//! Children get an explicit argument vector, never a shell. stdout is read
//! line by line (qemu-img ends progress lines with `\r`) and handed to the
//! caller; stderr is drained on its own thread so a chatty child cannot
//! block on a full pipe, and its last few KiB are kept for the error. A
//! cancel flag is polled while the child runs: when it is set the child is
//! killed and reaped. A child is never left running or unreaped.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

/// How much of a child's stderr an error keeps: enough for qemu-img's or
/// lvcreate's reason, small enough for a JSON status body.
const STDERR_TAIL_BYTES: usize = 4096;

/// How often a running child is checked for cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// First wait for a child whose stdout has closed to exit; doubled up to
/// [`CANCEL_POLL`].
const EXIT_POLL_FIRST: Duration = Duration::from_millis(1);

/// Why a child process did not succeed.
#[derive(Debug)]
pub enum CmdError {
    /// The program is not installed or not on PATH.
    NotFound { program: String },
    /// The program exists but could not be started (permissions, resources).
    Spawn { program: String, source: io::Error },
    /// The program ran and reported failure; `stderr` is the tail of its output.
    Failed { program: String, status: ExitStatus, stderr: String },
    /// The job was cancelled and the child was killed.
    Cancelled { program: String },
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::NotFound { program } => write!(f, "{program} not found on PATH"),
            CmdError::Spawn { program, .. } => write!(f, "could not start {program}"),
            CmdError::Failed { program, status, stderr } => {
                let what = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, Some(libc::SIGXCPU | libc::SIGKILL)) => {
                        "was killed by a signal (past its CPU time limit, or out of memory)"
                            .to_string()
                    }
                    (None, _) => "was killed by a signal".to_string(),
                };
                let stderr = stderr.trim();
                if stderr.is_empty() {
                    write!(f, "{program} {what}")
                } else {
                    write!(f, "{program} {what}: {stderr}")
                }
            }
            CmdError::Cancelled { program } => write!(f, "{program} was stopped by cancel"),
        }
    }
}

impl std::error::Error for CmdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CmdError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a successful child printed on stdout (stderr goes to the debug log).
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
}

/// Runs `argv` to completion and returns its output. Any exit status other
/// than 0 is an error carrying the stderr tail.
pub fn run(argv: &[String]) -> Result<Output, CmdError> {
    run_with(argv, None, None, &mut |_| {})
}

/// Runs `argv` under `limits` if any, passing each stdout line (split on
/// `\n` or `\r`) to `on_line`, and kills the child when `cancel` becomes
/// true.
pub fn run_with(
    argv: &[String],
    limits: Option<Limits>,
    cancel: Option<&AtomicBool>,
    on_line: &mut dyn FnMut(&str),
) -> Result<Output, CmdError> {
    let program = argv.first().cloned().unwrap_or_default();
    let (status, stdout, stderr) = run_inner(argv, cancel, on_line, limits)?;
    if status.success() {
        if !stderr.trim().is_empty() {
            log::debug!("{program} said on stderr: {}", stderr.trim());
        }
        Ok(Output { stdout })
    } else {
        Err(CmdError::Failed { program, status, stderr })
    }
}

/// Resource limits for a child that reads untrusted input (qemu-img on a
/// downloaded image), set with setrlimit(2) between fork and exec: a
/// crafted image that makes the parser allocate without end or loop hits
/// the limit and the child dies, instead of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_AS, bytes of address space.
    pub address_space: u64,
    /// RLIMIT_CPU, seconds of CPU time; past it the kernel kills the child.
    pub cpu_secs: u64,
}

/// How a child run with [`run_limited`] ended.
#[derive(Debug)]
pub struct Finished {
    /// The exit status, one of the accepted codes.
    pub code: i32,
    pub stdout: String,
}

/// Runs `argv` under `limits`. Exit statuses in `ok_codes` are returned
/// with stdout (qemu-img check reports findings with 2 and 3 and still
/// prints its report); any other status, or death by a signal, is an error.
pub fn run_limited(
    argv: &[String],
    limits: Limits,
    ok_codes: &[i32],
) -> Result<Finished, CmdError> {
    let program = argv.first().cloned().unwrap_or_default();
    let (status, stdout, stderr) = run_inner(argv, None, &mut |_| {}, Some(limits))?;
    match status.code() {
        Some(code) if ok_codes.contains(&code) => {
            if !stderr.trim().is_empty() {
                log::debug!("{program} said on stderr: {}", stderr.trim());
            }
            Ok(Finished { code, stdout })
        }
        _ => Err(CmdError::Failed { program, status, stderr }),
    }
}

/// Sets one resource limit, soft and hard, in the child.
fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: value as libc::rlim_t, rlim_max: value as libc::rlim_t };
    // SAFETY: setrlimit is async-signal-safe; `limit` lives on this stack.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Spawns `argv`, relays stdout lines, and returns the exit status with
/// all of stdout (up to 1 MiB) and the stderr tail.
fn run_inner(
    argv: &[String],
    cancel: Option<&AtomicBool>,
    on_line: &mut dyn FnMut(&str),
    limits: Option<Limits>,
) -> Result<(ExitStatus, String, String), CmdError> {
    let program = argv.first().cloned().unwrap_or_default();
    match limits {
        Some(l) => log::debug!(
            "running {} (limits: {} MiB address space, {}s CPU)",
            argv.join(" "),
            l.address_space >> 20,
            l.cpu_secs
        ),
        None => log::debug!("running {}", argv.join(" ")),
    }
    let mut command = Command::new(&program);
    // If the daemon dies (kill -9, OOM), its children die with it instead
    // of writing on into a volume that nobody tracks any more.
    // SAFETY: prctl and setrlimit are async-signal-safe and the closure
    // touches only its own copy of `limits`.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(l) = limits {
                set_limit(libc::RLIMIT_AS, l.address_space)?;
                set_limit(libc::RLIMIT_CPU, l.cpu_secs)?;
            }
            Ok(())
        });
    }
    let mut child = command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CmdError::NotFound { program: program.clone() },
            _ => CmdError::Spawn { program: program.clone(), source },
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut guard = Reaper(Some(child));
    let (tx, stdout_rx) = crossbeam_channel::unbounded::<String>();
    thread::Builder::new()
        .name("cmd-stdout".into())
        .spawn(move || split_lines(stdout, |line| drop(tx.send(line))))
        .expect("spawn stdout reader");
    let stderr_thread = thread::Builder::new()
        .name("cmd-stderr".into())
        .spawn(move || read_tail(stderr))
        .expect("spawn stderr reader");

    let mut stdout_all = String::new();
    let mut cancelled = false;
    loop {
        match stdout_rx.recv_timeout(CANCEL_POLL) {
            Ok(line) => {
                on_line(&line);
                if stdout_all.len() < 1 << 20 {
                    stdout_all.push_str(&line);
                    stdout_all.push('\n');
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // stdout closed: the child has exited or closed it; wait below.
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            cancelled = true;
            break;
        }
    }
    let is_cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    // stdout closes a moment before the child exits: wait in short naps
    // that grow to CANCEL_POLL, so a quick qemu-img costs milliseconds
    // here, not a whole poll interval (it once cost up to 100 ms a run).
    let mut nap = EXIT_POLL_FIRST;
    let status = loop {
        if cancelled || is_cancelled() {
            guard.kill_and_reap();
            break None;
        }
        match guard.try_wait() {
            Ok(Some(status)) => break Some(Ok(status)),
            Ok(None) => {
                thread::sleep(nap);
                nap = (nap * 2).min(CANCEL_POLL);
            }
            Err(err) => break Some(Err(err)),
        }
    };
    let stderr = stderr_thread.join().unwrap_or_default();
    match status {
        None => Err(CmdError::Cancelled { program }),
        Some(Ok(status)) => Ok((status, stdout_all, stderr)),
        Some(Err(source)) => Err(CmdError::Spawn { program, source }),
    }
}

/// Kills and reaps a child that is still running when dropped, so an early
/// return or a panic never leaves a zombie or a stray qemu-img behind.
struct Reaper(Option<Child>);

impl Reaper {
    /// The exit status once the child has exited; the child is then reaped.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let child = self.0.as_mut().expect("child present");
        let status = child.try_wait()?;
        if status.is_some() {
            self.0 = None;
        }
        Ok(status)
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            log::warn!("killing child process {} that was still running", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads `r` to its end, calling `emit` for every line ended by `\n` or `\r`.
fn split_lines(mut r: impl Read, mut emit: impl FnMut(String)) {
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                if !line.is_empty() {
                    emit(String::from_utf8_lossy(&line).into_owned());
                    line.clear();
                }
            } else if line.len() < 64 * 1024 {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        emit(String::from_utf8_lossy(&line).into_owned());
    }
}

/// Reads `r` to its end and returns its last [`STDERR_TAIL_BYTES`].
fn read_tail(mut r: impl Read) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
        }
    }
    if tail.len() > STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_failure_carries_status_and_stderr() {
        let err = run(&argv(&["sh", "-c", "echo boom >&2; exit 3"])).unwrap_err();
        assert_eq!(err.to_string(), "sh exited with status 3: boom");
    }

    #[test]
    fn test_missing_program_is_not_found() {
        let err = run(&argv(&["no-such-program-lvp"])).unwrap_err();
        assert!(matches!(err, CmdError::NotFound { .. }), "{err}");
    }

    #[test]
    fn test_progress_lines_split_on_carriage_return() {
        let mut lines = Vec::new();
        run_with(&argv(&["printf", "a\\rb\\nc"]), None, None, &mut |l| lines.push(l.to_string()))
            .unwrap();
        assert_eq!(lines, ["a", "b", "c"]);
    }

    #[test]
    fn test_cancel_kills_child_promptly() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = Arc::clone(&flag);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            setter.store(true, Ordering::Relaxed);
        });
        let start = Instant::now();
        let err = run_with(&argv(&["sleep", "30"]), None, Some(&flag), &mut |_| {}).unwrap_err();
        assert!(matches!(err, CmdError::Cancelled { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn test_limits_reach_the_child() {
        let limits = Limits { address_space: 512 << 20, cpu_secs: 7 };
        let out = run_limited(&argv(&["sh", "-c", "ulimit -v; ulimit -t"]), limits, &[0]).unwrap();
        assert_eq!(out.stdout.split_whitespace().collect::<Vec<_>>(), ["524288", "7"]);
        // A child that tries to allocate more than its address space fails.
        let limits = Limits { address_space: 64 << 20, cpu_secs: 5 };
        let hog = ["python3", "-c", "b = bytearray(256 << 20)"];
        if std::process::Command::new("python3").arg("-V").output().is_ok() {
            assert!(run_limited(&argv(&hog), limits, &[0]).is_err());
        }
        // Other accepted exit codes come back with stdout.
        let out = run_limited(&argv(&["sh", "-c", "echo r; exit 3"]), limits, &[0, 3]).unwrap();
        assert_eq!((out.code, out.stdout.as_str()), (3, "r\n"));
    }

    #[test]
    fn test_cpu_limit_kills_a_spinning_child() {
        let limits = Limits { address_space: 256 << 20, cpu_secs: 1 };
        let start = Instant::now();
        let err = run_limited(&argv(&["sh", "-c", "while :; do :; done"]), limits, &[0]);
        let err = err.unwrap_err().to_string();
        assert!(err.contains("killed by a signal (past its CPU time limit"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn test_stderr_tail_is_bounded() {
        let script = "head -c 100000 /dev/zero | tr '\\0' x >&2; exit 1";
        match run(&argv(&["sh", "-c", script])).unwrap_err() {
            CmdError::Failed { stderr, .. } => assert_eq!(stderr.len(), STDERR_TAIL_BYTES),
            other => panic!("expected a failure, got {other}"),
        }
    }
}
