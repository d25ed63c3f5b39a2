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
use std::os::unix::process::CommandExt;
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
                let what = match status.code() {
                    Some(code) => format!("exited with status {code}"),
                    None => "was killed by a signal".to_string(),
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
    run_with(argv, None, &mut |_| {})
}

/// Runs `argv`, passing each stdout line (split on `\n` or `\r`) to
/// `on_line`, and kills the child when `cancel` becomes true.
pub fn run_with(
    argv: &[String],
    cancel: Option<&AtomicBool>,
    on_line: &mut dyn FnMut(&str),
) -> Result<Output, CmdError> {
    let program = argv.first().cloned().unwrap_or_default();
    log::debug!("running {}", argv.join(" "));
    let mut command = Command::new(&program);
    // If the daemon dies (kill -9, OOM), its children die with it instead
    // of writing on into a volume that nobody tracks any more.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
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
    let status = loop {
        if cancelled || is_cancelled() {
            guard.kill_and_reap();
            break None;
        }
        match guard.try_wait() {
            Ok(Some(status)) => break Some(Ok(status)),
            Ok(None) => thread::sleep(CANCEL_POLL),
            Err(err) => break Some(Err(err)),
        }
    };
    let stderr = stderr_thread.join().unwrap_or_default();
    match status {
        None => Err(CmdError::Cancelled { program }),
        Some(Ok(status)) if status.success() => {
            if !stderr.trim().is_empty() {
                log::debug!("{program} said on stderr: {}", stderr.trim());
            }
            Ok(Output { stdout: stdout_all })
        }
        Some(Ok(status)) => Err(CmdError::Failed { program, status, stderr }),
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
        run_with(&argv(&["printf", "a\\rb\\nc"]), None, &mut |l| lines.push(l.to_string()))
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
        let err = run_with(&argv(&["sleep", "30"]), Some(&flag), &mut |_| {}).unwrap_err();
        assert!(matches!(err, CmdError::Cancelled { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
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
