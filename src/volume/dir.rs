//! The `dir` backend: each volume is a raw file `<volume-dir>/<name>`.
//!
//! A new volume is a sparse file of the requested size, so it reads as
//! zeros and zero blocks need not be written. An existing file is reused
//! when its size is close enough and no process has it open (checked in
//! `/proc/*/fd`, which as root sees every process, a qemu VM included).
//!
//! Only a plain file with one name is written: a symbolic link or a second
//! hard link could point the write at a file outside the directory, and an
//! open file is recognised by its inode, whatever name its holder used.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{size_is_reusable, Volume, VolumeBackend, VolumeError};

pub struct DirBackend {
    dir: PathBuf,
}

impl DirBackend {
    pub fn new(dir: &Path) -> io::Result<DirBackend> {
        fs::create_dir_all(dir)?;
        Ok(DirBackend { dir: dir.canonicalize()? })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl VolumeBackend for DirBackend {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn check(&self) -> Result<(), String> {
        let probe = self.dir.join(format!(".lvp-ready-probe-{}", std::process::id()));
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| format!("volume directory {} not writable: {e}", self.dir.display()))
    }

    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn prepare(
        &self,
        name: &str,
        size: u64,
        _job: &str,
        before_create: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Volume, VolumeError> {
        let path = self.path(name);
        let shown = path.display().to_string();
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                if meta.file_type().is_symlink() {
                    return Err(VolumeError::not_a_volume(&shown, "a symbolic link"));
                }
                if !meta.is_file() {
                    return Err(VolumeError::not_a_volume(&shown, "not a regular file"));
                }
                if meta.nlink() > 1 {
                    let what = format!("a file with {} hard links (names elsewhere)", meta.nlink());
                    return Err(VolumeError::not_a_volume(&shown, &what));
                }
                if is_open(&path).map_err(|e| VolumeError::backend(&shown, "look up", e))? {
                    return Err(VolumeError::in_use(&shown));
                }
                if !size_is_reusable(meta.len(), size) {
                    return Err(VolumeError::size_mismatch(&shown, meta.len(), size));
                }
                log::info!("reusing existing volume file {shown} ({} bytes)", meta.len());
                Ok(Volume {
                    name: name.into(),
                    path,
                    size: meta.len(),
                    created: false,
                    reads_as_zero: false,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                before_create().map_err(|why| VolumeError::refused(&shown, "create", why))?;
                // A disk holds a guest's secrets: owner only, as libvirt's
                // own dir pool makes its volumes.
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| VolumeError::backend(&shown, "create", e))?;
                // Not flushed here: the job's flush at the end covers the
                // file's size with its data, and then the directory entry
                // (see write::finish_volume); a crash before that leaves a
                // file or none, and the journaled intent removes either.
                let made = file.set_len(size);
                if let Err(e) = made {
                    let _ = fs::remove_file(&path);
                    return Err(VolumeError::backend(&shown, "create", e));
                }
                log::info!("created volume file {shown} ({size} bytes, sparse)");
                Ok(Volume { name: name.into(), path, size, created: true, reads_as_zero: true })
            }
            Err(e) => Err(VolumeError::backend(&shown, "look up", e)),
        }
    }

    /// A file cannot carry an owner tag, so the journal's record that the
    /// job created (or was about to create) it is the proof. The job
    /// created the file with O_EXCL after seeing no file there.
    ///
    /// Known limitation: if someone replaced the file between the crash and
    /// the restart, the replacement is removed; an LV's tag would have told
    /// the two apart, a file has nothing equivalent.
    fn remove_after_restart(&self, name: &str, _job: &str) -> Result<bool, VolumeError> {
        let path = self.path(name);
        let shown = path.display().to_string();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                fs::remove_file(&path).map_err(|e| VolumeError::backend(&shown, "remove", e))?;
                log::info!("removed volume file {shown} left by an interrupted job");
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VolumeError::backend(&shown, "look up", e)),
        }
    }

    fn remove(&self, volume: &Volume) -> Result<(), VolumeError> {
        let shown = volume.path.display().to_string();
        fs::remove_file(&volume.path).map_err(|e| VolumeError::backend(&shown, "remove", e))?;
        log::info!("removed volume file {shown}");
        Ok(())
    }
}

/// Whether any process holds the file at `path` open, judged from
/// `/proc/*/fd` by device and inode, so a holder that opened it under
/// another name (since removed) counts too. Processes we may not inspect
/// are skipped (as root there are none).
pub fn is_open(path: &Path) -> io::Result<bool> {
    let meta = fs::metadata(path)?;
    let target = (meta.dev(), meta.ino());
    for proc_entry in fs::read_dir("/proc")? {
        let Ok(proc_entry) = proc_entry else { continue };
        let name = proc_entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // stat through the /proc link reaches the open file itself.
            if fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == target) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::VolumeErrorKind;
    use std::fs::File;

    fn backend(tag: &str) -> (DirBackend, PathBuf) {
        let dir = std::env::temp_dir().join(format!("lvp-dir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        (DirBackend::new(&dir).unwrap(), dir)
    }

    #[test]
    fn test_create_then_reuse_then_refuse() {
        let (b, dir) = backend("reuse");
        let v = b.prepare("vm-1", 1 << 20, "j", &mut || Ok(())).unwrap();
        assert!(v.created && v.reads_as_zero);
        assert_eq!(fs::metadata(&v.path).unwrap().len(), 1 << 20);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&v.path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "a new volume is readable by its owner only");

        let again = b.prepare("vm-1", 1 << 20, "j", &mut || Ok(())).unwrap();
        assert!(!again.created && !again.reads_as_zero);

        let err = b.prepare("vm-1", 4 << 20, "j", &mut || Ok(())).unwrap_err();
        assert_eq!(err.kind, VolumeErrorKind::SizeMismatch);

        let _held = File::open(&v.path).unwrap();
        let err = b.prepare("vm-1", 1 << 20, "j", &mut || Ok(())).unwrap_err();
        assert_eq!(err.kind, VolumeErrorKind::InUse, "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_second_hard_link_is_refused_and_its_file_untouched() {
        let (b, dir) = backend("hardlink");
        let outside = dir.with_extension("outside");
        fs::write(&outside, vec![7u8; 1 << 20]).unwrap();
        fs::hard_link(&outside, dir.join("evil")).unwrap();
        let err = b.prepare("evil", 1 << 20, "j", &mut || Ok(())).unwrap_err();
        assert_eq!(err.kind, VolumeErrorKind::NotAVolume);
        assert!(err.to_string().contains("hard links"), "{err}");
        assert_eq!(fs::read(&outside).unwrap(), vec![7u8; 1 << 20]);
        fs::remove_file(&outside).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_file_held_open_under_a_removed_name_is_open() {
        let (b, dir) = backend("heldname");
        let v = b.prepare("vm-1", 1 << 20, "j", &mut || Ok(())).unwrap();
        let other = dir.join("other-name");
        fs::hard_link(&v.path, &other).unwrap();
        let _held = File::open(&other).unwrap();
        fs::remove_file(&other).unwrap();
        assert!(is_open(&v.path).unwrap(), "held through a name that is gone");
        let err = b.prepare("vm-1", 1 << 20, "j", &mut || Ok(())).unwrap_err();
        assert_eq!(err.kind, VolumeErrorKind::InUse, "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_symlink_is_refused() {
        let (b, dir) = backend("link");
        std::os::unix::fs::symlink("/etc/hostname", dir.join("evil")).unwrap();
        let err = b.prepare("evil", 1 << 20, "j", &mut || Ok(())).unwrap_err();
        assert_eq!(err.kind, VolumeErrorKind::NotAVolume);
        assert!(fs::read_link(dir.join("evil")).is_ok(), "the link is left alone");
        fs::remove_dir_all(&dir).unwrap();
    }
}
