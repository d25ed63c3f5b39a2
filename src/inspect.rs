//! What an image is, decided before any volume is touched.
//!
//! For a qcow2, in this order: our own header reader ([`crate::qcow2`])
//! looks at the file before qemu-img ever opens it, then
//! `qemu-img check` (which finds truncated and corrupt tables that
//! `qemu-img convert` would silently read as zeros), then `qemu-img info`.
//! Both qemu-img runs are under limits on address space and CPU time
//! ([`INFO_LIMITS`], [`CHECK_LIMITS`]). A check that reports corruptions
//! or could not finish refuses the image; leaked clusters alone (space
//! allocated but not referenced, left by a crashed writer) do not, since
//! they change no byte of the disk's content: they are logged.
//!
//! The declared format is always passed with `-f`: qemu-img never probes, so
//! a raw image that starts with a qcow2 header stays raw bytes, and a file
//! declared qcow2 that is not one fails here. Images that would make
//! qemu-img read other files (a backing file, an external data file), that
//! are encrypted, or that are larger than the volume are refused.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::api::ImageType;
use crate::cmd::{self, CmdError, Limits};
use crate::qcow2::{self, Qcow2Error};

/// Limits for `qemu-img info`: it reads the header and a few tables.
/// Measured: info and check on a 100 GiB qcow2 run within 64 MiB of
/// address space in well under a second.
pub const INFO_LIMITS: Limits = Limits { address_space: 1 << 30, cpu_secs: 30 };

/// Limits for `qemu-img check`: it walks every L2 table and keeps a
/// refcount array in memory, so it gets more room than info.
pub const CHECK_LIMITS: Limits = Limits { address_space: 2 << 30, cpu_secs: 120 };

/// The facts about an image that decide whether we write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub virtual_size: u64,
    pub backing_file: Option<String>,
    pub data_file: Option<String>,
    pub encrypted: bool,
}

/// Why an image is not written.
#[derive(Debug)]
pub enum InspectError {
    /// qemu-img could not read the image as the declared format.
    Unreadable { format: ImageType, source: CmdError },
    /// qemu-img printed something we could not parse.
    BadReport { reason: String },
    /// The image names a backing file that qemu-img would read into the volume.
    BackingFile { name: String },
    /// The image keeps its data in another file.
    DataFile { name: String },
    /// The image is encrypted; we hold no keys.
    Encrypted,
    /// The image's disk is larger than the volume asked for.
    TooLarge { virtual_size: u64, volume_size: u64 },
    /// Our own header reader refused the qcow2 (not one, truncated, tables
    /// past the end, unknown features).
    Header(Qcow2Error),
    /// `qemu-img check` could not run or finish on the image.
    CheckFailed { source: CmdError },
    /// `qemu-img check` found the image corrupt.
    Corrupt { corruptions: u64, check_errors: u64 },
}

impl fmt::Display for InspectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InspectError::Unreadable { format, .. } => {
                write!(f, "image is not a readable {format} image")
            }
            InspectError::BadReport { reason } => {
                write!(f, "unexpected qemu-img info output: {reason}")
            }
            InspectError::BackingFile { name } => write!(
                f,
                "image has a backing file ({name}); refusing it, since its content would come \
                 from that file: flatten it with qemu-img convert first"
            ),
            InspectError::DataFile { name } => write!(
                f,
                "image keeps its data in an external file ({name}); refusing it: \
                 convert it to a self-contained image first"
            ),
            InspectError::Encrypted => write!(f, "image is encrypted; refusing it"),
            InspectError::TooLarge { virtual_size, volume_size } => write!(
                f,
                "image's virtual size {virtual_size} bytes is larger than the volume's \
                 {volume_size} bytes: ask for a larger volume_size_gb"
            ),
            InspectError::Header(_) => write!(f, "image refused before qemu-img opened it"),
            InspectError::CheckFailed { .. } => {
                write!(f, "qemu-img check could not check the image")
            }
            InspectError::Corrupt { corruptions, check_errors } => write!(
                f,
                "qemu-img check found the image corrupt ({corruptions} corruptions, \
                 {check_errors} check errors); refusing it: rebuild the image"
            ),
        }
    }
}

impl std::error::Error for InspectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InspectError::Unreadable { source, .. } => Some(source),
            InspectError::CheckFailed { source } => Some(source),
            InspectError::Header(source) => Some(source),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct Report {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(default)]
    encrypted: bool,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Deserialize)]
struct FormatData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
    encrypt: Option<serde_json::Value>,
}

impl InspectError {
    /// Whether the fault is in the image itself, whatever volume it was
    /// meant for: such an image is of no use to any job, and its cache
    /// entry is deleted. A size refusal depends on the request, and a
    /// qemu-img that is missing or was killed says nothing about the image.
    pub fn condemns_image(&self) -> bool {
        match self {
            InspectError::TooLarge { .. } => false,
            InspectError::Header(Qcow2Error::Io(_)) => false,
            InspectError::Unreadable { source, .. } | InspectError::CheckFailed { source } => {
                matches!(source, CmdError::Failed { status, .. } if status.code().is_some())
            }
            _ => true,
        }
    }
}

/// Inspects the image at `path` as `format`: for qcow2 our header reader
/// and `qemu-img check` first, then `qemu-img info`.
pub fn inspect(path: &Path, format: ImageType) -> Result<ImageInfo, InspectError> {
    if read_header(path, format)?.is_some() {
        check_consistency(path)?;
    }
    let argv = info_argv(path, format);
    let out = cmd::run_limited(&argv, INFO_LIMITS, &[0])
        .map_err(|source| InspectError::Unreadable { format, source })?;
    log::debug!("qemu-img info {}: {}", path.display(), out.stdout.trim());
    parse_info(&out.stdout)
}

/// Our own reading of a qcow2 header (`None` for raw): cheap, no qemu-img,
/// and it refuses backing files, data files and encryption by itself.
pub fn read_header(path: &Path, format: ImageType) -> Result<Option<qcow2::Header>, InspectError> {
    if format != ImageType::Qcow2 {
        return Ok(None);
    }
    let header = qcow2::examine_file(path).map_err(|e| match e {
        Qcow2Error::BackingFile { name } => InspectError::BackingFile { name },
        Qcow2Error::DataFile { name } => InspectError::DataFile { name },
        Qcow2Error::Encrypted { .. } => InspectError::Encrypted,
        e => InspectError::Header(e),
    })?;
    log::debug!("qcow2 header of {}: {header:?}", path.display());
    Ok(Some(header))
}

/// Runs `qemu-img check` on a qcow2 and refuses it on corruptions.
fn check_consistency(path: &Path) -> Result<(), InspectError> {
    let argv: Vec<String> = vec![
        "qemu-img".into(),
        "check".into(),
        "--output=json".into(),
        "-f".into(),
        "qcow2".into(),
        path.display().to_string(),
    ];
    // 0: clean; 2: corruptions; 3: leaks only. 1 (could not check) and
    // anything else is an error.
    let out = cmd::run_limited(&argv, CHECK_LIMITS, &[0, 2, 3])
        .map_err(|source| InspectError::CheckFailed { source })?;
    let report = parse_check(&out.stdout)?;
    if report.corruptions > 0 || report.check_errors > 0 || out.code == 2 {
        return Err(InspectError::Corrupt {
            corruptions: report.corruptions,
            check_errors: report.check_errors,
        });
    }
    if report.leaks > 0 {
        log::info!(
            "qemu-img check: {} has {} leaked clusters; they hold no disk content, accepting it",
            path.display(),
            report.leaks
        );
    }
    Ok(())
}

/// The counts `qemu-img check --output=json` reports.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct CheckReport {
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default)]
    pub leaks: u64,
    #[serde(default, rename = "check-errors")]
    pub check_errors: u64,
}

pub fn parse_check(json: &str) -> Result<CheckReport, InspectError> {
    serde_json::from_str(json).map_err(|e| InspectError::BadReport { reason: e.to_string() })
}

pub fn info_argv(path: &Path, format: ImageType) -> Vec<String> {
    vec![
        "qemu-img".into(),
        "info".into(),
        "--output=json".into(),
        "-f".into(),
        format.as_str().into(),
        path.display().to_string(),
    ]
}

pub fn parse_info(json: &str) -> Result<ImageInfo, InspectError> {
    let report: Report = serde_json::from_str(json)
        .map_err(|e| InspectError::BadReport { reason: e.to_string() })?;
    let data = report.format_specific.and_then(|f| f.data);
    let encrypted = report.encrypted || data.as_ref().is_some_and(|d| d.encrypt.is_some());
    Ok(ImageInfo {
        virtual_size: report.virtual_size,
        backing_file: report.full_backing_filename.or(report.backing_filename),
        data_file: data.and_then(|d| d.data_file),
        encrypted,
    })
}

/// Refuses an image that must not be written into a volume of `volume_size` bytes.
pub fn check(info: &ImageInfo, volume_size: u64) -> Result<(), InspectError> {
    if let Some(name) = &info.backing_file {
        return Err(InspectError::BackingFile { name: name.clone() });
    }
    if let Some(name) = &info.data_file {
        return Err(InspectError::DataFile { name: name.clone() });
    }
    if info.encrypted {
        return Err(InspectError::Encrypted);
    }
    if info.virtual_size > volume_size {
        return Err(InspectError::TooLarge { virtual_size: info.virtual_size, volume_size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from qemu-img 10.0.2 `info --output=json -f qcow2` on images
    // made with `qemu-img create` (see tests/fixtures/README.md).
    const BACKING: &str = r#"{"backing-filename-format": "raw", "virtual-size": 1048576,
        "filename": "b.qcow2", "format": "qcow2", "actual-size": 200704,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}},
        "full-backing-filename": "/etc/hostname", "backing-filename": "/etc/hostname",
        "dirty-flag": false}"#;
    const DATA_FILE: &str = r#"{"virtual-size": 1048576, "format": "qcow2",
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
        "data-file": "/tmp/qi/data.raw", "data-file-raw": false}}, "dirty-flag": false}"#;
    const ENCRYPTED: &str = r#"{"virtual-size": 1048576, "format": "qcow2",
        "format-specific": {"type": "qcow2", "data": {"encrypt": {"format": "luks"}}},
        "encrypted": true}"#;
    const PLAIN: &str = r#"{"virtual-size": 2147483648, "format": "qcow2",
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#;

    #[test]
    fn test_refusals() {
        let err = check(&parse_info(BACKING).unwrap(), 1 << 30).unwrap_err();
        assert!(err.to_string().contains("backing file (/etc/hostname)"), "{err}");
        let err = check(&parse_info(DATA_FILE).unwrap(), 1 << 30).unwrap_err();
        assert!(err.to_string().contains("/tmp/qi/data.raw"), "{err}");
        let err = check(&parse_info(ENCRYPTED).unwrap(), 1 << 30).unwrap_err();
        assert_eq!(err.to_string(), "image is encrypted; refusing it");
    }

    #[test]
    fn test_size_limit_is_inclusive() {
        let info = parse_info(PLAIN).unwrap();
        assert_eq!(info.virtual_size, 2 << 30);
        assert!(check(&info, 2 << 30).is_ok());
        let err = check(&info, (2 << 30) - 1).unwrap_err();
        assert!(matches!(err, InspectError::TooLarge { .. }));
    }

    #[test]
    fn test_check_reports() {
        // From qemu-img 10.0.2 check on a truncated image with data.
        let cut = r#"{"image-end-offset": 2031616, "total-clusters": 48,
            "corruptions": 22, "check-errors": 0, "allocated-clusters": 48,
            "filename": "dt.qcow2", "format": "qcow2"}"#;
        assert_eq!(parse_check(cut).unwrap().corruptions, 22);
        let clean = r#"{"image-end-offset": 262144, "total-clusters": 16,
            "check-errors": 0, "filename": "b.qcow2", "format": "qcow2"}"#;
        assert_eq!(parse_check(clean).unwrap(), CheckReport::default());
        assert!(parse_check("ERROR").is_err());
    }

    #[test]
    fn test_size_refusal_keeps_the_cache_entry() {
        let big = InspectError::TooLarge { virtual_size: 2, volume_size: 1 };
        assert!(!big.condemns_image());
        assert!(InspectError::BackingFile { name: "x".into() }.condemns_image());
        assert!(InspectError::Header(Qcow2Error::NotQcow2).condemns_image());
        let missing = CmdError::NotFound { program: "qemu-img".into() };
        assert!(!InspectError::CheckFailed { source: missing }.condemns_image());
    }

    #[test]
    fn test_garbage_report() {
        assert!(matches!(parse_info("nope"), Err(InspectError::BadReport { .. })));
    }
}
