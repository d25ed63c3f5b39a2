//! Writing a verified cached image into a volume, with progress, and
//! flushing it to stable storage before the job may say `completed`.
//!
//! qcow2 goes through `qemu-img convert -n -f qcow2 -O raw` (`-n`: the
//! volume already exists; `--target-is-zero` only when the volume provably
//! reads as zeros). raw is copied by us, skipping all-zero blocks when the
//! volume reads as zeros, so a sparse image stays sparse.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cmd::{self, CmdError};
use crate::volume::Volume;

/// Copy block size for raw images.
const BLOCK: usize = 1 << 20;

#[derive(Debug)]
pub enum WriteError {
    /// qemu-img failed or was cancelled.
    Convert(CmdError),
    /// Reading the image or writing the volume failed.
    Io(io::Error),
    /// The job was cancelled during the copy.
    Cancelled,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Convert(_) => f.write_str("qemu-img convert failed"),
            WriteError::Io(_) => f.write_str("copy failed"),
            WriteError::Cancelled => f.write_str("write cancelled"),
        }
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WriteError::Convert(e) => Some(e),
            WriteError::Io(e) => Some(e),
            WriteError::Cancelled => None,
        }
    }
}

impl WriteError {
    pub fn is_cancel(&self) -> bool {
        matches!(self, WriteError::Cancelled | WriteError::Convert(CmdError::Cancelled { .. }))
    }
}

pub fn convert_argv(image: &Path, volume: &Volume) -> Vec<String> {
    let mut argv: Vec<String> =
        ["qemu-img", "convert", "-p", "-n", "-f", "qcow2", "-O", "raw"].map(String::from).into();
    if volume.reads_as_zero {
        argv.push("--target-is-zero".into());
    }
    argv.push(image.display().to_string());
    argv.push(volume.path.display().to_string());
    argv
}

/// Converts a qcow2 image into the volume. `progress` gets a percentage.
pub fn convert_qcow2(
    image: &Path,
    volume: &Volume,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(f64),
) -> Result<(), WriteError> {
    let argv = convert_argv(image, volume);
    cmd::run_with(&argv, Some(cancel), &mut |line| {
        if let Some(pct) = parse_progress(line) {
            progress(pct);
        }
    })
    .map(|_| ())
    .map_err(WriteError::Convert)
}

/// Reads qemu-img's `    (45.12/100%)` progress lines.
pub fn parse_progress(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok().filter(|p: &f64| (0.0..=100.0).contains(p))
}

/// Copies a raw image of `len` bytes into the volume. `progress` gets the
/// bytes copied so far.
pub fn copy_raw(
    image: &Path,
    len: u64,
    volume: &Volume,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<(), WriteError> {
    let mut src = File::open(image).map_err(WriteError::Io)?;
    let mut dst = OpenOptions::new().write(true).open(&volume.path).map_err(WriteError::Io)?;
    let mut buf = vec![0u8; BLOCK];
    let mut done = 0u64;
    while done < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        let want = (len - done).min(BLOCK as u64) as usize;
        src.read_exact(&mut buf[..want]).map_err(WriteError::Io)?;
        if volume.reads_as_zero && buf[..want].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(want as i64)).map_err(WriteError::Io)?;
        } else {
            dst.write_all(&buf[..want]).map_err(WriteError::Io)?;
        }
        done += want as u64;
        progress(done);
    }
    Ok(())
}

/// Ends a write: zeroes the volume from `image_end` to its end unless it
/// provably reads as zeros there (or `keep_tail`), then flushes the
/// volume's data to stable storage (fdatasync on the file or device).
///
/// Without the zeroing, a reused volume, or a new plain LV on extents an
/// old LV used, would show the guest whatever lay there before: another
/// tenant's data, or an old partition table's backup GPT at the end.
pub fn finish_volume(
    volume: &Volume,
    image_end: u64,
    keep_tail: bool,
    cancel: &AtomicBool,
) -> Result<(), WriteError> {
    let f = OpenOptions::new().write(true).open(&volume.path).map_err(WriteError::Io)?;
    if !volume.reads_as_zero && !keep_tail && volume.size > image_end {
        zero_range(&f, image_end, volume.size - image_end, cancel)?;
    }
    f.sync_data().map_err(WriteError::Io)
}

/// Makes `len` bytes from `offset` read as zeros: by fallocate where the
/// file system or device can (no data written), else by writing zeros.
fn zero_range(f: &File, offset: u64, len: u64, cancel: &AtomicBool) -> Result<(), WriteError> {
    use std::os::fd::AsRawFd;
    for mode in [
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    ] {
        // SAFETY: fallocate on a descriptor we own, with in-range values.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
    }
    log::debug!("fallocate cannot zero here; writing {len} zero bytes");
    let zeros = vec![0u8; BLOCK];
    let mut done = 0u64;
    while done < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        let n = (len - done).min(BLOCK as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(f, &zeros[..n], offset + done)
            .map_err(WriteError::Io)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn test_parse_progress() {
        assert_eq!(parse_progress("    (45.12/100%)"), Some(45.12));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
        assert_eq!(parse_progress("(120.00/100%)"), None);
    }

    #[test]
    fn test_convert_argv_uses_target_is_zero_only_on_zeroed_volumes() {
        let mut v = Volume {
            name: "a".into(),
            path: PathBuf::from("/dev/vg0/a"),
            size: 1,
            created: true,
            reads_as_zero: false,
        };
        let plain = convert_argv(Path::new("/c/x.img"), &v).join(" ");
        assert_eq!(plain, "qemu-img convert -p -n -f qcow2 -O raw /c/x.img /dev/vg0/a");
        v.reads_as_zero = true;
        assert!(convert_argv(Path::new("/c/x.img"), &v).contains(&"--target-is-zero".into()));
    }
}
