//! Logging to stderr (journald adds its own timestamps under systemd, but
//! ours stay for runs by hand). Each line: time, level, thread name, text.
//! Only this crate's lines are shown: library debug output (rustls, ureq)
//! would drown the job lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::LevelFilter;
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode, ThreadLogMode};

pub fn init(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_thread_level(LevelFilter::Error)
        .set_thread_mode(ThreadLogMode::Names)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .add_filter_allow_str("libvirt_volume_provisioner")
        .build();
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, ColorChoice::Never);
}

/// Lines a remote party can cause at will (failed authentication, failed
/// TLS handshakes, requests the front door refuses, deadlines passed): at
/// most this many a second are logged, so that nobody who can reach the
/// port can fill the disk or drown the job lines.
const REMOTE_LINES_PER_SEC: u32 = 20;

struct Budget {
    window: Instant,
    used: u32,
    dropped: u64,
}

static REMOTE_BUDGET: Mutex<Option<Budget>> = Mutex::new(None);

/// Whether a line a remote party caused may be logged now. `Some(note)`:
/// log it, with `note` appended (it counts the lines dropped before it,
/// or is empty); `None`: drop it (it is counted).
pub fn remote_line() -> Option<String> {
    let now = Instant::now();
    let mut guard = REMOTE_BUDGET.lock().unwrap_or_else(|e| e.into_inner());
    let budget = guard.get_or_insert(Budget { window: now, used: 0, dropped: 0 });
    if now.duration_since(budget.window) >= Duration::from_secs(1) {
        budget.window = now;
        budget.used = 0;
    }
    if budget.used >= REMOTE_LINES_PER_SEC {
        budget.dropped += 1;
        return None;
    }
    budget.used += 1;
    let dropped = std::mem::take(&mut budget.dropped);
    Some(match dropped {
        0 => String::new(),
        n => format!(
            " ({n} earlier lines caused by clients were not logged: over \
             {REMOTE_LINES_PER_SEC} a second)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the budget lines are dropped and counted, and the next line
    /// logged in a new second says how many.
    #[test]
    fn test_remote_lines_are_limited_and_the_dropped_counted() {
        let logged = (0..REMOTE_LINES_PER_SEC + 15).filter_map(|_| remote_line()).count();
        // Another test in this process may share the budget; never more.
        assert!(logged <= REMOTE_LINES_PER_SEC as usize, "{logged} lines in one second");
        std::thread::sleep(Duration::from_millis(1100));
        let note = remote_line().expect("a new second has a new budget");
        assert!(note.contains("earlier lines caused by clients were not logged"), "{note}");
        assert_eq!(remote_line().as_deref(), Some(""), "counted once");
    }
}
