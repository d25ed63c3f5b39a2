//! Writing a verified cached image into a volume, with progress, and
//! flushing it to stable storage before the job may say `completed`.
//!
//! qcow2 goes through `qemu-img convert -n -f qcow2 -O raw` (`-n`: the
//! volume already exists; `--target-is-zero` only when the volume provably
//! reads as zeros). raw is copied by us: when the volume reads as zeros,
//! only the cache entry's data extents are read (SEEK_DATA/SEEK_HOLE) and
//! their all-zero blocks skipped, so a sparse image stays sparse and its
//! holes cost nothing; otherwise every byte is written. A raw image that a
//! job downloads into a volume it created is written on the way instead
//! ([`VolumeTee`]), and this copy does not happen at all.
//!
//! With `--direct-io` the volume is written with O_DIRECT, past the host's
//! page cache, and qemu-img does it for both formats (`-t none`; it knows
//! the alignment O_DIRECT asks for): raw images too are then copied by
//! `qemu-img convert -f raw`, and never while downloading.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::api::ImageType;
use crate::cmd::{self, CmdError};
use crate::fetch::{write_skipping_zeros, Sink, SparseFile};
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

/// How the volume is written: through the page cache (the default) or
/// with O_DIRECT (`--direct-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    Buffered,
    Direct,
}

/// The `qemu-img convert` command that writes `image`, read as `format`
/// (never probed), into the existing volume.
pub fn convert_argv(image: &Path, format: ImageType, volume: &Volume, io: IoMode) -> Vec<String> {
    let mut argv: Vec<String> =
        ["qemu-img", "convert", "-p", "-n", "-f", format.as_str()].map(String::from).into();
    argv.extend(["-O", "raw"].map(String::from));
    if io == IoMode::Direct {
        argv.extend(["-t", "none"].map(String::from));
    }
    if volume.reads_as_zero {
        argv.push("--target-is-zero".into());
    }
    argv.push(image.display().to_string());
    argv.push(volume.path.display().to_string());
    argv
}

/// Limits for `qemu-img convert` into a volume of `size` bytes. The image
/// has passed our header reader, `info` and `check` by then, but convert
/// parses it again: a crafted image that slipped through must not make it
/// allocate or spin without end. It stays under 30 MB resident here; the
/// CPU time allows 10 s per GiB written (100 MiB/s, slower than
/// decompressing a compressed qcow2 on any CPU in use) plus a minute.
pub fn convert_limits(size: u64) -> cmd::Limits {
    let gib = size.div_ceil(1 << 30);
    cmd::Limits { address_space: 2 << 30, cpu_secs: 60 + 10 * gib }
}

/// Writes an image into the volume with qemu-img: every qcow2, and raw
/// images under `--direct-io`. `progress` gets a percentage.
pub fn convert(
    image: &Path,
    format: ImageType,
    volume: &Volume,
    io: IoMode,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(f64),
) -> Result<(), WriteError> {
    let argv = convert_argv(image, format, volume, io);
    cmd::run_with(&argv, Some(convert_limits(volume.size)), Some(cancel), &mut |line| {
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
    let src = File::open(image).map_err(WriteError::Io)?;
    let dst = OpenOptions::new().write(true).open(&volume.path).map_err(WriteError::Io)?;
    let mut buf = vec![0u8; BLOCK];
    // Ranges of the image to copy: only its data extents when the volume
    // reads as zeros (a hole is zeros already there), else all of it.
    let extents = if volume.reads_as_zero {
        data_extents(&src, len).map_err(WriteError::Io)?
    } else {
        vec![(0, len)]
    };
    for (start, end) in extents {
        let mut at = start;
        while at < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(WriteError::Cancelled);
            }
            let want = (end - at).min(BLOCK as u64) as usize;
            src.read_exact_at(&mut buf[..want], at).map_err(WriteError::Io)?;
            if volume.reads_as_zero {
                write_skipping_zeros(&dst, at, &buf[..want]).map_err(WriteError::Io)?;
            } else {
                dst.write_all_at(&buf[..want], at).map_err(WriteError::Io)?;
            }
            at += want as u64;
            progress(at);
        }
    }
    progress(len);
    Ok(())
}

/// The data extents of the first `len` bytes of `file`, as (start, end)
/// pairs, from SEEK_DATA and SEEK_HOLE. A file system without them reports
/// the whole file as data, which is still correct.
fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`: the rest is a hole
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        if (data as u64) < end {
            out.push((data as u64, end));
        }
        at = hole;
    }
    Ok(out)
}

/// The sink of a raw image's download when the job created its volume:
/// every block goes to the cache's temporary file and, at the same offset,
/// into the volume (zero blocks skipped when the volume reads as zeros).
/// The volume gets bytes whose digest is not known yet; that is safe only
/// because the volume is this job's own and a failed job, a digest
/// mismatch included, removes it (a restart does the same from the
/// journal). A volume the job did not create is never handed here.
pub struct VolumeTee {
    cache: SparseFile,
    volume: Option<(File, Volume)>,
    /// End of the highest range written into the volume, to wipe on reset.
    high: u64,
}

impl VolumeTee {
    /// A sink for the cache file alone when `volume` is `None`.
    pub fn new(cache: SparseFile, volume: Option<&Volume>) -> io::Result<VolumeTee> {
        let volume = match volume {
            Some(v) if v.created => {
                Some((OpenOptions::new().write(true).open(&v.path)?, v.clone()))
            }
            _ => None,
        };
        Ok(VolumeTee { cache, volume, high: 0 })
    }

    /// Whether the volume is written too.
    pub fn streams(&self) -> bool {
        self.volume.is_some()
    }

    pub fn into_cache_file(self) -> File {
        self.cache.file
    }

    fn too_large(len: u64, size: u64) -> io::Error {
        io::Error::other(format!(
            "the image is larger than the volume ({len} bytes or more, the volume has {size}); \
             ask for a larger volume_size_gb"
        ))
    }
}

impl Sink for VolumeTee {
    fn expect(&mut self, len: u64) -> io::Result<()> {
        match &self.volume {
            Some((_, v)) if len > v.size => Err(Self::too_large(len, v.size)),
            _ => Ok(()),
        }
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.cache.put(offset, data)?;
        if let Some((file, v)) = &self.volume {
            let end = offset + data.len() as u64;
            if end > v.size {
                return Err(Self::too_large(end, v.size));
            }
            if v.reads_as_zero {
                write_skipping_zeros(file, offset, data)?;
            } else {
                file.write_all_at(data, offset)?;
            }
            self.high = self.high.max(end);
        }
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        self.cache.reset()?;
        if let Some((file, _)) = &self.volume {
            // The volume must read as zeros again where the aborted
            // attempt wrote, or zero blocks of the next would be skipped
            // over stale bytes.
            let never = AtomicBool::new(false);
            zero_range(file, 0, self.high, &never).map_err(|e| match e {
                WriteError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
            self.high = 0;
        }
        Ok(())
    }

    fn finish(&mut self, len: u64) -> io::Result<()> {
        self.cache.finish(len)
    }
}

/// Ends a write: zeroes the volume from `image_end` to its end unless it
/// provably reads as zeros there (or `keep_tail`), then flushes the
/// volume's data to stable storage (fdatasync on the file or device), and
/// for a file the job created, its directory.
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
    f.sync_data().map_err(WriteError::Io)?;
    // A file this job created also needs its directory entry on disk (a
    // device node of an LV does not; LVM keeps its own metadata).
    if volume.created && f.metadata().map_err(WriteError::Io)?.is_file() {
        if let Some(dir) = volume.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(WriteError::Io)?;
        }
    }
    Ok(())
}

/// Proves that files in `dir` take O_DIRECT writes (tmpfs, for one, does
/// not), so that `--direct-io` fails at start rather than in every job.
pub fn direct_io_probe(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_DIRECT wants the buffer, offset and length aligned to the logical
    // block size; 4096 covers every device in use. An aligned block is cut
    // out of a buffer twice its size.
    const ALIGN: usize = 4096;
    let probe = dir.join(format!(".lvp-direct-probe-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|f| {
            let buf = vec![0u8; 2 * ALIGN];
            let start = buf.as_ptr().align_offset(ALIGN);
            f.write_all_at(&buf[start..start + ALIGN], 0)
        });
    let _ = fs::remove_file(&probe);
    written.map_err(|e| {
        format!(
            "--direct-io: the file system of {} does not take O_DIRECT writes ({e}); \
             drop --direct-io or put the volumes elsewhere",
            dir.display()
        )
    })
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
        f.write_all_at(&zeros[..n], offset + done).map_err(WriteError::Io)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lvp-write-{tag}-{}", std::process::id()))
    }

    fn volume_at(path: &Path, size: u64, reads_as_zero: bool) -> Volume {
        File::create(path).unwrap().set_len(size).unwrap();
        Volume { name: "v".into(), path: path.to_path_buf(), size, created: true, reads_as_zero }
    }

    /// A sparse image copied into a zeroed volume: the same bytes, and its
    /// holes stay holes; into a volume that does not read as zeros, stale
    /// bytes under the image's holes are overwritten.
    #[test]
    fn test_copy_raw_follows_data_extents_and_overwrites_stale_bytes() {
        use std::os::unix::fs::MetadataExt;
        let (image, vol) = (scratch("img"), scratch("vol"));
        let len = 8 << 20;
        let f = File::create(&image).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&[5u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[6u8; 100], len - 100).unwrap();
        drop(f);
        let never = AtomicBool::new(false);
        let v = volume_at(&vol, 16 << 20, true);
        copy_raw(&image, len, &v, &never, &mut |_| {}).unwrap();
        assert_eq!(fs::read(&vol).unwrap()[..len as usize], fs::read(&image).unwrap()[..]);
        assert!(fs::metadata(&vol).unwrap().blocks() * 512 <= 1 << 20, "holes stay holes");

        let v = volume_at(&vol, 16 << 20, false);
        File::options().write(true).open(&vol).unwrap().write_all_at(&[1u8; 8192], 0).unwrap();
        copy_raw(&image, len, &v, &never, &mut |_| {}).unwrap();
        assert_eq!(fs::read(&vol).unwrap()[..len as usize], fs::read(&image).unwrap()[..]);
        fs::remove_file(&image).unwrap();
        fs::remove_file(&vol).unwrap();
    }

    /// The tee writes the volume at the download's offsets, refuses bytes
    /// past the volume's end, and after a reset the volume reads as zeros
    /// again where the aborted attempt wrote.
    #[test]
    fn test_volume_tee_writes_refuses_overflow_and_wipes_on_reset() {
        let (cache, vol) = (scratch("tee-cache"), scratch("tee-vol"));
        let v = volume_at(&vol, 1 << 20, true);
        let cache_file = File::create(&cache).unwrap();
        let mut tee = VolumeTee::new(SparseFile { file: cache_file }, Some(&v)).unwrap();
        assert!(tee.streams());
        assert!(tee.expect(2 << 20).is_err(), "an announced length past the volume is refused");
        tee.put(0, &[7u8; 1000]).unwrap();
        tee.put(1000, &[8u8; 24]).unwrap();
        tee.reset().unwrap();
        assert!(fs::read(&vol).unwrap().iter().all(|&b| b == 0), "reset wipes the volume");
        tee.put(0, &[9u8; 10]).unwrap();
        assert!(tee.put((1 << 20) - 4, &[1u8; 8]).is_err(), "bytes past the end are refused");
        tee.finish(10).unwrap();
        assert_eq!(&fs::read(&vol).unwrap()[..11], &[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
        assert_eq!(fs::read(&cache).unwrap(), vec![9u8; 10]);

        let reused = Volume { created: false, ..v };
        let file = File::create(&cache).unwrap();
        let tee = VolumeTee::new(SparseFile { file }, Some(&reused)).unwrap();
        assert!(!tee.streams(), "a volume the job did not create is never streamed into");
        fs::remove_file(&cache).unwrap();
        fs::remove_file(&vol).unwrap();
    }

    /// The probe passes on the disk the build is on and leaves no file
    /// behind; where it cannot write, it names the flag and the directory.
    /// (No file system here refuses O_DIRECT itself: tmpfs takes it since
    /// Linux 6.6.)
    #[test]
    fn test_direct_io_probe_passes_on_disk_and_names_the_flag_when_it_fails() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("lvp-direct-probe-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        direct_io_probe(&dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "the probe file is removed");
        let gone = dir.join("missing");
        let e = direct_io_probe(&gone).unwrap_err();
        assert!(e.starts_with("--direct-io: ") && e.contains(&gone.display().to_string()), "{e}");
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn test_parse_progress() {
        assert_eq!(parse_progress("    (45.12/100%)"), Some(45.12));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
        assert_eq!(parse_progress("(120.00/100%)"), None);
    }

    #[test]
    fn test_convert_argv_passes_the_format_and_io_mode_and_target_is_zero_only_on_zeroed_volumes() {
        let mut v = Volume {
            name: "a".into(),
            path: PathBuf::from("/dev/vg0/a"),
            size: 1,
            created: true,
            reads_as_zero: false,
        };
        let img = Path::new("/c/x.img");
        let plain = convert_argv(img, ImageType::Qcow2, &v, IoMode::Buffered).join(" ");
        assert_eq!(plain, "qemu-img convert -p -n -f qcow2 -O raw /c/x.img /dev/vg0/a");
        let direct = convert_argv(img, ImageType::Raw, &v, IoMode::Direct).join(" ");
        assert_eq!(direct, "qemu-img convert -p -n -f raw -O raw -t none /c/x.img /dev/vg0/a");
        v.reads_as_zero = true;
        let zeroed = convert_argv(img, ImageType::Qcow2, &v, IoMode::Buffered);
        assert!(zeroed.contains(&"--target-is-zero".into()));
    }
}
