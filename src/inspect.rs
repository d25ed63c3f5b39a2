//! What an image is, asked of `qemu-img info` before any volume is touched.
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
use crate::cmd::{self, CmdError};

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
        }
    }
}

impl std::error::Error for InspectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InspectError::Unreadable { source, .. } => Some(source),
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

/// Runs `qemu-img info` on `path` as `format`.
pub fn inspect(path: &Path, format: ImageType) -> Result<ImageInfo, InspectError> {
    let argv = info_argv(path, format);
    let out = cmd::run(&argv).map_err(|source| InspectError::Unreadable { format, source })?;
    log::debug!("qemu-img info {}: {}", path.display(), out.stdout.trim());
    parse_info(&out.stdout)
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
    fn test_garbage_report() {
        assert!(matches!(parse_info("nope"), Err(InspectError::BadReport { .. })));
    }
}
