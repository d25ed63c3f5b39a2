//! Logging to stderr (journald adds its own timestamps under systemd, but
//! ours stay for runs by hand). Each line: time, level, thread name, text.
//! Only this crate's lines are shown: library debug output (rustls, ureq)
//! would drown the job lines.

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
