//! Where images are written: one trait, two backends.
//!
//! `lvm` (production) keeps each volume as a logical volume in one volume
//! group; `dir` keeps each as a raw file in one directory (libvirt `dir`
//! pools, tests, the quick start). Both create a volume or reuse one of
//! about the right size, refuse one that is open, and remove only volumes
//! the job itself created.

pub mod dir;
pub mod lvm;

use std::fmt;
use std::path::PathBuf;

/// A volume ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The name from the request.
    pub name: String,
    /// Where its bytes are: a device node or a file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether this job created it (and so may remove it on failure).
    pub created: bool,
    /// Whether every byte provably reads as zero (a fresh sparse file or a
    /// new thin LV), so zero blocks need not be written.
    pub reads_as_zero: bool,
}

pub trait VolumeBackend: Send + Sync {
    /// `lvm` or `dir`.
    fn kind(&self) -> &'static str;

    /// Whether the backend can take work now (for `/readyz`): the reason
    /// when it cannot.
    fn check(&self) -> Result<(), String>;

    /// Settings that work but cost the operator something (a thin pool
    /// that does not zero new chunks), one sentence each, for `check`.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// How logs and errors name the volume: `vg0/vm-1` or a file path.
    fn describe(&self, name: &str) -> String;

    /// Creates the volume with `size` bytes, or reuses an existing one
    /// within [`REUSE_TOLERANCE`] of it. Refuses one that is open.
    /// `before_create` runs right before a volume is created (the job
    /// journals its intent there); its error stops the creation.
    fn prepare(
        &self,
        name: &str,
        size: u64,
        job: &str,
        before_create: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Volume, VolumeError>;

    /// Removes a volume this job created.
    fn remove(&self, volume: &Volume) -> Result<(), VolumeError>;

    /// After a restart: removes volume `name` if job `job` created it (and
    /// it still exists). Returns whether something was removed.
    fn remove_after_restart(&self, name: &str, job: &str) -> Result<bool, VolumeError>;
}

/// An existing volume is reused when its size is within this fraction of
/// the requested size: LVM rounds sizes up to its extent size, and a
/// reprovision should not fail over a few MiB.
pub const REUSE_TOLERANCE: f64 = 0.05;

pub fn size_is_reusable(existing: u64, requested: u64) -> bool {
    let diff = existing.abs_diff(requested) as f64;
    diff <= requested as f64 * REUSE_TOLERANCE
}

/// What kind of failure, for the API's error code and the job's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeErrorKind {
    /// The volume is open (a running VM?) and must not be written.
    InUse,
    /// The volume exists with a size too far from the request.
    SizeMismatch,
    /// A path exists under the name but is not something we can write.
    NotAVolume,
    /// A backend command or file operation failed.
    Backend,
}

#[derive(Debug)]
pub struct VolumeError {
    pub kind: VolumeErrorKind,
    /// The volume as [`VolumeBackend::describe`] names it.
    pub volume: String,
    /// What we were doing: `create`, `reuse`, `remove`, `look up`.
    pub op: &'static str,
    /// A sentence for kinds that have no source error.
    pub detail: Option<String>,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl VolumeError {
    pub fn backend(
        volume: &str,
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        VolumeError {
            kind: VolumeErrorKind::Backend,
            volume: volume.into(),
            op,
            detail: None,
            source: Some(Box::new(source)),
        }
    }

    pub fn in_use(volume: &str) -> Self {
        VolumeError {
            kind: VolumeErrorKind::InUse,
            volume: volume.into(),
            op: "reuse",
            detail: None,
            source: None,
        }
    }

    pub fn size_mismatch(volume: &str, existing: u64, requested: u64) -> Self {
        VolumeError {
            kind: VolumeErrorKind::SizeMismatch,
            volume: volume.into(),
            op: "reuse",
            detail: Some(format!(
                "it exists with {existing} bytes, more than 5% away from the requested \
                 {requested} bytes; remove it or ask for its size"
            )),
            source: None,
        }
    }

    pub fn refused(volume: &str, op: &'static str, why: String) -> Self {
        VolumeError {
            kind: VolumeErrorKind::Backend,
            volume: volume.into(),
            op,
            detail: Some(why),
            source: None,
        }
    }

    pub fn not_a_volume(volume: &str, what: &str) -> Self {
        VolumeError {
            kind: VolumeErrorKind::NotAVolume,
            volume: volume.into(),
            op: "reuse",
            detail: Some(format!("it exists but is {what}; refusing to write it")),
            source: None,
        }
    }
}

impl fmt::Display for VolumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.detail) {
            (VolumeErrorKind::InUse, _) => write!(
                f,
                "volume {} is open (a running VM?): refusing to overwrite; stop the VM or \
                 pick another volume_name",
                self.volume
            ),
            (_, Some(detail)) => write!(f, "{} volume {}: {detail}", self.op, self.volume),
            (_, None) => write!(f, "{} volume {}", self.op, self.volume),
        }
    }
}

impl std::error::Error for VolumeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_reuse_tolerance() {
        let gib = 1u64 << 30;
        assert!(size_is_reusable(50 * gib, 50 * gib));
        assert!(size_is_reusable(52 * gib, 50 * gib));
        assert!(size_is_reusable(48 * gib, 50 * gib));
        assert!(!size_is_reusable(53 * gib, 50 * gib));
        assert!(!size_is_reusable(10 * gib, 50 * gib));
    }

    #[test]
    fn test_in_use_message_says_what_to_do() {
        assert_eq!(
            VolumeError::in_use("vg0/vm-1").to_string(),
            "volume vg0/vm-1 is open (a running VM?): refusing to overwrite; stop the VM or \
             pick another volume_name"
        );
    }
}
