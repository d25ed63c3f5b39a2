//! Our own reading of a qcow2 header, done before qemu-img ever opens the
//! file.
//!
//! qemu-img follows whatever a qcow2 names: a backing file or an external
//! data file (a host path, or a `json:` description of one) is read and its
//! bytes end up in the volume; `qemu-img convert` exits 0 on an image whose
//! tables point past the end of the file and writes zeros instead. So the
//! file is checked here first, from its bytes alone: magic, version 2 or 3,
//! incompatible feature bits (unknown ones, the corrupt bit and the external
//! data file bit refuse it), the backing file, the header extensions (an
//! external data file name or an encryption header refuses it), the
//! encryption method, the cluster size, and that the L1 table, the
//! refcount table, the snapshot table and every L2 table and data cluster
//! the tables name lie inside the file.
//!
//! This reads the format as described in qemu's `docs/interop/qcow2.rst`;
//! it does not replace `qemu-img check`, which [`crate::inspect`] also runs.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// Length of a version 2 header, and the smallest header we read.
const V2_HEADER_LEN: usize = 72;
/// Smallest header length a version 3 image may declare.
const V3_MIN_HEADER_LEN: usize = 104;

/// qemu accepts cluster sizes from 512 bytes to 2 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits (header bytes 72-79).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every bit this reader knows; any other refuses the image, since qemu
/// would read the file in a way we have not checked.
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The longest backing file name qemu accepts.
const MAX_BACKING_NAME: u32 = 1023;
/// The most header extensions we walk before calling the header hostile.
const MAX_EXTENSIONS: usize = 64;
/// The most L1 entries we accept: qemu's own limit (32 MiB of L1 table).
const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// The most L2 table bytes we read to check where data clusters lie;
/// past that (an image of several TiB) only the L1 table is checked and
/// `qemu-img check` covers the rest.
const MAX_L2_SCAN_BYTES: u64 = 256 << 20;
/// Bits 9..55 of an L1 or standard L2 entry hold a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 62 of an L2 entry: the cluster is compressed.
const L2_COMPRESSED: u64 = 1 << 62;

/// What we learned from a sound qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_bits: u32,
    pub incompatible_features: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    /// Whether every L2 table was read and checked (false past
    /// [`MAX_L2_SCAN_BYTES`] or with extended L2 entries).
    ///
    /// Known limitation: when false, data clusters are left to
    /// `qemu-img check` alone.
    pub l2_checked: bool,
}

/// Why a file is not a qcow2 image we are willing to hand to qemu-img.
#[derive(Debug)]
pub enum Qcow2Error {
    /// Reading the file failed.
    Io(io::Error),
    /// The file does not start with the qcow2 magic: it is not a qcow2
    /// image at all (perhaps raw, declared as qcow2 by mistake).
    NotQcow2,
    /// The file ends before a part the header says it has.
    Truncated { what: &'static str, needed: u64, file_len: u64 },
    /// A version other than 2 or 3.
    Version(u32),
    /// Incompatible feature bits this reader does not know.
    UnknownFeatures(u64),
    /// qemu marked the image corrupt when it last wrote it.
    MarkedCorrupt,
    /// The image names a backing file; `name` is cleaned for display.
    BackingFile { name: String },
    /// The image keeps its data in an external file.
    DataFile { name: String },
    /// The image is encrypted (`method`: 1 AES, 2 LUKS).
    Encrypted { method: u32 },
    /// A header field out of the range qemu allows.
    BadField { field: &'static str, value: u64 },
    /// A table or cluster the image names lies outside the file.
    OutOfFile { what: &'static str, offset: u64, file_len: u64 },
}

impl fmt::Display for Qcow2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Qcow2Error::Io(_) => write!(f, "cannot read the qcow2 header"),
            Qcow2Error::NotQcow2 => {
                write!(f, "file is not a qcow2 image (no qcow2 magic); was it declared raw?")
            }
            Qcow2Error::Truncated { what, needed, file_len } => write!(
                f,
                "qcow2 image is truncated: its {what} needs {needed} bytes, the file has {file_len}"
            ),
            Qcow2Error::Version(v) => write!(f, "qcow2 version {v} is not 2 or 3"),
            Qcow2Error::UnknownFeatures(bits) => {
                write!(f, "qcow2 image uses unknown incompatible features {bits:#x}")
            }
            Qcow2Error::MarkedCorrupt => write!(f, "qcow2 image is marked corrupt"),
            Qcow2Error::BackingFile { name } => write!(f, "qcow2 image names backing file {name}"),
            Qcow2Error::DataFile { name } => {
                write!(f, "qcow2 image keeps its data in external file {name}")
            }
            Qcow2Error::Encrypted { method } => {
                let how = match method {
                    1 => "AES",
                    2 => "LUKS",
                    _ => "an unknown method",
                };
                write!(f, "qcow2 image is encrypted with {how}")
            }
            Qcow2Error::BadField { field, value } => {
                write!(f, "qcow2 header field {field} has an impossible value {value}")
            }
            Qcow2Error::OutOfFile { what, offset, file_len } => write!(
                f,
                "qcow2 {what} at offset {offset} lies past the end of the file \
                 ({file_len} bytes): the image is truncated or corrupt"
            ),
        }
    }
}

impl std::error::Error for Qcow2Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Qcow2Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Qcow2Error {
    fn from(e: io::Error) -> Qcow2Error {
        Qcow2Error::Io(e)
    }
}

/// Checks the qcow2 file at `path`.
pub fn examine_file(path: &Path) -> Result<Header, Qcow2Error> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    examine(&mut file, len)
}

/// Checks a qcow2 image of `file_len` bytes read through `r`. Never
/// trusts a length from the file to size a buffer beyond what the file holds.
pub fn examine<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Header, Qcow2Error> {
    let mut fixed = [0u8; V3_MIN_HEADER_LEN];
    let got = read_at_most(r, 0, &mut fixed)?;
    if got < 4 || fixed[..4] != MAGIC {
        return Err(Qcow2Error::NotQcow2);
    }
    if got < V2_HEADER_LEN {
        return Err(Qcow2Error::Truncated {
            what: "header",
            needed: V2_HEADER_LEN as u64,
            file_len,
        });
    }
    let be32 = |at: usize| u32::from_be_bytes(fixed[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(fixed[at..at + 8].try_into().unwrap());
    let version = be32(4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::Version(version));
    }
    let backing_offset = be64(8);
    let backing_size = be32(16);
    let cluster_bits = be32(20);
    let virtual_size = be64(24);
    let crypt_method = be32(32);
    let l1_entries = u64::from(be32(36));
    let l1_offset = be64(40);
    let refcount_offset = be64(48);
    let refcount_clusters = u64::from(be32(56));
    let snapshots = u64::from(be32(60));
    let snapshots_offset = be64(64);

    let (incompatible, header_len) = if version == 3 {
        if got < V3_MIN_HEADER_LEN {
            return Err(Qcow2Error::Truncated {
                what: "version 3 header",
                needed: V3_MIN_HEADER_LEN as u64,
                file_len,
            });
        }
        let header_len = u64::from(be32(100));
        if header_len < V3_MIN_HEADER_LEN as u64 || !header_len.is_multiple_of(8) {
            return Err(Qcow2Error::BadField { field: "header_length", value: header_len });
        }
        let refcount_order = be32(96);
        if refcount_order > 6 {
            return Err(Qcow2Error::BadField {
                field: "refcount_order",
                value: refcount_order.into(),
            });
        }
        (be64(72), header_len)
    } else {
        (0, V2_HEADER_LEN as u64)
    };

    // The fields that decide whether qemu would read another file, or
    // need a key, come first: they are the reason this module exists.
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(Qcow2Error::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    if crypt_method != 0 {
        return Err(Qcow2Error::Encrypted { method: crypt_method });
    }
    if backing_offset != 0 || backing_size != 0 {
        let name = read_name(r, backing_offset, backing_size, file_len)?;
        return Err(Qcow2Error::BackingFile { name });
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Qcow2Error::BadField { field: "cluster_bits", value: cluster_bits.into() });
    }
    let cluster = 1u64 << cluster_bits;
    if header_len > cluster {
        return Err(Qcow2Error::BadField { field: "header_length", value: header_len });
    }

    // Header extensions run from the end of the header to the end of the
    // first cluster.
    let data_file_name = walk_extensions(r, header_len, cluster.min(file_len))?;
    if let Some(name) = data_file_name {
        return Err(Qcow2Error::DataFile { name });
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        // The bit without the name: qemu would take the name from the
        // command line; still an image whose data lives elsewhere.
        return Err(Qcow2Error::DataFile { name: "(not named in the image)".into() });
    }
    if incompatible & INCOMPAT_COMPRESSION != 0 && header_len > V3_MIN_HEADER_LEN as u64 {
        // Compression type byte 104: 0 zlib, 1 zstd.
        let mut t = [0u8; 1];
        read_exact_at(r, V3_MIN_HEADER_LEN as u64, &mut t, file_len, "header")?;
        if t[0] > 1 {
            return Err(Qcow2Error::BadField { field: "compression_type", value: t[0].into() });
        }
    }

    // The tables must lie inside the file, and the L1 table must be able
    // to map the whole virtual disk.
    let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
    let l2_entry_bytes = if extended_l2 { 16 } else { 8 };
    let l2_entries = cluster / l2_entry_bytes;
    let bytes_per_l1 = l2_entries.saturating_mul(cluster);
    let l1_needed = virtual_size.div_ceil(bytes_per_l1);
    if l1_entries > MAX_L1_ENTRIES || l1_entries < l1_needed {
        return Err(Qcow2Error::BadField { field: "l1_size", value: l1_entries });
    }
    within(file_len, "L1 table", l1_offset, l1_entries * 8, cluster, l1_entries > 0)?;
    within(
        file_len,
        "refcount table",
        refcount_offset,
        refcount_clusters.saturating_mul(cluster),
        cluster,
        true,
    )?;
    if snapshots > 0 {
        // Each snapshot table entry is at least 40 bytes.
        within(file_len, "snapshot table", snapshots_offset, snapshots * 40, 8, true)?;
    }

    let mut l1 = vec![0u8; (l1_entries * 8) as usize];
    read_exact_at(r, l1_offset, &mut l1, file_len, "L1 table")?;
    let l2_tables: Vec<u64> = l1
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().unwrap()) & OFFSET_MASK)
        .filter(|&off| off != 0)
        .collect();
    for &off in &l2_tables {
        within(file_len, "L2 table", off, cluster, cluster, true)?;
    }
    let l2_checked = !extended_l2 && (l2_tables.len() as u64) * cluster <= MAX_L2_SCAN_BYTES;
    if l2_checked {
        let mut table = vec![0u8; cluster as usize];
        for &off in &l2_tables {
            read_exact_at(r, off, &mut table, file_len, "L2 table")?;
            for e in table.chunks_exact(8) {
                let entry = u64::from_be_bytes(e.try_into().unwrap());
                if entry & L2_COMPRESSED != 0 {
                    // Compressed: the host offset is in the low
                    // 62 - (cluster_bits - 8) bits.
                    let bits = 62 - (cluster_bits - 8);
                    let host = entry & ((1u64 << bits) - 1);
                    if host >= file_len {
                        return Err(Qcow2Error::OutOfFile {
                            what: "compressed cluster",
                            offset: host,
                            file_len,
                        });
                    }
                } else {
                    let host = entry & OFFSET_MASK;
                    if host != 0 {
                        within(file_len, "data cluster", host, cluster, cluster, true)?;
                    }
                }
            }
        }
    } else if !extended_l2 {
        log::debug!("qcow2: {} L2 tables are too many to scan; relying on qemu-img check", {
            l2_tables.len()
        });
    }
    Ok(Header {
        version,
        virtual_size,
        cluster_bits,
        incompatible_features: incompatible,
        l1_entries,
        l1_offset,
        l2_checked,
    })
}

/// Checks that `len` bytes at `offset` lie inside a file of `file_len`
/// bytes and that `offset` is aligned to `align`.
fn within(
    file_len: u64,
    what: &'static str,
    offset: u64,
    len: u64,
    align: u64,
    required: bool,
) -> Result<(), Qcow2Error> {
    if !required {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(align) {
        return Err(Qcow2Error::BadField { field: what_field(what), value: offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Qcow2Error::OutOfFile { what, offset, file_len }),
    }
}

fn what_field(what: &'static str) -> &'static str {
    match what {
        "L1 table" => "l1_table_offset",
        "refcount table" => "refcount_table_offset",
        "snapshot table" => "snapshots_offset",
        "L2 table" => "L1 entry",
        _ => "L2 entry",
    }
}

/// Walks the header extensions between `from` and `end`; returns the
/// external data file's name if one is named. An encryption header
/// extension refuses the image.
fn walk_extensions<R: Read + Seek>(
    r: &mut R,
    from: u64,
    end: u64,
) -> Result<Option<String>, Qcow2Error> {
    let mut at = from;
    for _ in 0..MAX_EXTENSIONS {
        if at + 8 > end {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        read_exact_at(r, at, &mut head, end, "header extension")?;
        let kind = u32::from_be_bytes(head[..4].try_into().unwrap());
        let len = u32::from_be_bytes(head[4..].try_into().unwrap());
        let data = at + 8;
        if kind == EXT_END {
            return Ok(None);
        }
        if data + u64::from(len) > end {
            return Err(Qcow2Error::BadField {
                field: "header extension length",
                value: len.into(),
            });
        }
        match kind {
            EXT_DATA_FILE => {
                let name = read_name(r, data, len, end)?;
                return Ok(Some(name));
            }
            EXT_CRYPTO_HEADER => return Err(Qcow2Error::Encrypted { method: 2 }),
            // Backing format, feature names and bitmaps change nothing
            // about which bytes qemu reads; qemu ignores unknown ones.
            EXT_BACKING_FORMAT | EXT_FEATURE_NAMES | EXT_BITMAPS => {}
            other => log::debug!("qcow2: ignoring unknown header extension {other:#x}"),
        }
        at = data + u64::from(len).div_ceil(8) * 8;
    }
    Err(Qcow2Error::BadField { field: "header extension count", value: MAX_EXTENSIONS as u64 })
}

/// Reads a name of `len` bytes at `offset` for an error message: control
/// characters are replaced, and a name that is not in the file is said so.
fn read_name<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    len: u32,
    file_len: u64,
) -> Result<String, Qcow2Error> {
    if len == 0 || len > MAX_BACKING_NAME || offset.saturating_add(len.into()) > file_len {
        return Ok(format!("(a name of {len} bytes at offset {offset})"));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact_at(r, offset, &mut buf, file_len, "name")?;
    let text: String = String::from_utf8_lossy(&buf)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(256)
        .collect();
    Ok(format!("{text:?}"))
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many were read.
fn read_at_most<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    r.seek(SeekFrom::Start(offset))?;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_exact_at<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    buf: &mut [u8],
    file_len: u64,
    what: &'static str,
) -> Result<(), Qcow2Error> {
    let got = read_at_most(r, offset, buf)?;
    if got < buf.len() {
        return Err(Qcow2Error::Truncated { what, needed: offset + buf.len() as u64, file_len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::process::Command;

    /// A minimal sound version 3 image: 64 KiB clusters, 1 MiB virtual
    /// size, header in cluster 0, refcount table in cluster 1, L1 table
    /// in cluster 2, no data.
    fn crafted() -> Vec<u8> {
        let mut img = vec![0u8; 3 * 65536];
        img[..4].copy_from_slice(&MAGIC);
        put32(&mut img, 4, 3);
        put32(&mut img, 20, 16);
        put64(&mut img, 24, 1 << 20);
        put32(&mut img, 36, 1);
        put64(&mut img, 40, 2 * 65536);
        put64(&mut img, 48, 65536);
        put32(&mut img, 56, 1);
        put32(&mut img, 96, 4);
        put32(&mut img, 100, 112);
        img
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn check(img: &[u8]) -> Result<Header, Qcow2Error> {
        examine(&mut Cursor::new(img), img.len() as u64)
    }

    #[test]
    fn test_crafted_sound_image_passes() {
        let h = check(&crafted()).unwrap();
        assert_eq!((h.version, h.virtual_size, h.cluster_bits), (3, 1 << 20, 16));
        assert!(h.l2_checked);
    }

    #[test]
    fn test_not_qcow2_and_truncated_headers() {
        assert!(matches!(check(b""), Err(Qcow2Error::NotQcow2)));
        assert!(matches!(check(&[0u8; 4096]), Err(Qcow2Error::NotQcow2)));
        let img = crafted();
        assert!(matches!(check(&img[..40]), Err(Qcow2Error::Truncated { .. })));
        assert!(matches!(check(&img[..80]), Err(Qcow2Error::Truncated { .. })));
        // The L1 table lies in cluster 2: cut it off.
        let err = check(&img[..2 * 65536]).unwrap_err();
        assert!(matches!(err, Qcow2Error::OutOfFile { what: "L1 table", .. }), "{err}");
    }

    #[test]
    fn test_version_and_feature_bits() {
        let mut img = crafted();
        put32(&mut img, 4, 4);
        assert!(matches!(check(&img), Err(Qcow2Error::Version(4))));
        let mut img = crafted();
        put64(&mut img, 72, 1 << 5);
        assert!(matches!(check(&img), Err(Qcow2Error::UnknownFeatures(32))));
        let mut img = crafted();
        put64(&mut img, 72, INCOMPAT_CORRUPT);
        assert!(matches!(check(&img), Err(Qcow2Error::MarkedCorrupt)));
        let mut img = crafted();
        put64(&mut img, 72, INCOMPAT_DATA_FILE);
        assert!(matches!(check(&img), Err(Qcow2Error::DataFile { .. })));
        // Dirty alone is allowed: qemu-img check judges the refcounts.
        let mut img = crafted();
        put64(&mut img, 72, INCOMPAT_DIRTY);
        assert!(check(&img).is_ok());
    }

    #[test]
    fn test_backing_file_name_is_reported_cleaned() {
        let mut img = crafted();
        let name = b"json:{\"file.filename\":\"/etc/shadow\"}\n";
        img[512..512 + name.len()].copy_from_slice(name);
        put64(&mut img, 8, 512);
        put32(&mut img, 16, name.len() as u32);
        let err = check(&img).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/etc/shadow") && !text.contains('\n'), "{text}");
        // A name that is not in the file still refuses the image.
        put64(&mut img, 8, 1 << 40);
        assert!(matches!(check(&img), Err(Qcow2Error::BackingFile { .. })));
    }

    #[test]
    fn test_extensions() {
        let mut img = crafted();
        put32(&mut img, 112, EXT_BACKING_FORMAT);
        put32(&mut img, 116, 3);
        img[120..123].copy_from_slice(b"raw");
        put32(&mut img, 128, EXT_DATA_FILE);
        put32(&mut img, 132, 9);
        img[136..145].copy_from_slice(b"/dev/sda1");
        let err = check(&img).unwrap_err();
        assert!(err.to_string().contains("/dev/sda1"), "{err}");
        let mut img = crafted();
        put32(&mut img, 112, EXT_CRYPTO_HEADER);
        put32(&mut img, 116, 16);
        assert!(matches!(check(&img), Err(Qcow2Error::Encrypted { .. })));
        // An extension longer than the first cluster.
        let mut img = crafted();
        put32(&mut img, 112, 0x1234);
        put32(&mut img, 116, u32::MAX);
        assert!(matches!(check(&img), Err(Qcow2Error::BadField { .. })));
    }

    #[test]
    fn test_impossible_fields() {
        for (at, value) in [(20usize, 8u64), (20, 22), (36, 0)] {
            let mut img = crafted();
            put32(&mut img, at, value as u32);
            assert!(matches!(check(&img), Err(Qcow2Error::BadField { .. })), "{at}={value}");
        }
        let mut img = crafted();
        put32(&mut img, 32, 1);
        assert!(matches!(check(&img), Err(Qcow2Error::Encrypted { method: 1 })));
        // A virtual size the L1 table cannot map.
        let mut img = crafted();
        put64(&mut img, 24, 1 << 40);
        assert!(matches!(check(&img), Err(Qcow2Error::BadField { field: "l1_size", .. })));
        // An L1 table offset that is not cluster aligned.
        let mut img = crafted();
        put64(&mut img, 40, 2 * 65536 + 8);
        assert!(matches!(check(&img), Err(Qcow2Error::BadField { .. })));
    }

    #[test]
    fn test_l1_and_l2_entries_past_the_end() {
        let mut img = crafted();
        put64(&mut img, 2 * 65536, 10 * 65536);
        let err = check(&img).unwrap_err();
        assert!(matches!(err, Qcow2Error::OutOfFile { what: "L2 table", .. }), "{err}");
        // An L2 table in cluster 3 whose first entry points far away.
        let mut img = crafted();
        img.resize(4 * 65536, 0);
        put64(&mut img, 2 * 65536, 3 * 65536);
        put64(&mut img, 3 * 65536, 1 << 30);
        let err = check(&img).unwrap_err();
        assert!(matches!(err, Qcow2Error::OutOfFile { what: "data cluster", .. }), "{err}");
    }

    // ------------------------------------------------ images from qemu-img

    fn qemu_img(args: &[&str]) -> bool {
        match Command::new("qemu-img").args(args).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => panic!("qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr)),
            Err(_) => false,
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lvp-qcow2-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_real_images_from_qemu_img() {
        let dir = scratch("real");
        let p = |n: &str| dir.join(n).display().to_string();
        if !qemu_img(&["create", "-q", "-f", "qcow2", &p("plain.qcow2"), "8M"]) {
            if std::env::var_os("CI").is_some() {
                panic!("qemu-img is missing and CI is set");
            }
            eprintln!("skipping test_real_images_from_qemu_img: qemu-img not found");
            return;
        }
        let h = examine_file(&dir.join("plain.qcow2")).unwrap();
        assert_eq!((h.version, h.virtual_size), (3, 8 << 20));

        // v2, with data written so that L2 tables and clusters exist.
        std::fs::write(dir.join("data.raw"), vec![0x5a; 3 << 20]).unwrap();
        let v2 = p("v2.qcow2");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            &p("data.raw"),
            &v2,
        ]);
        let h = examine_file(Path::new(&v2)).unwrap();
        assert_eq!(h.version, 2);
        assert!(h.l2_checked);

        let comp = p("comp.qcow2");
        qemu_img(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", &p("data.raw"), &comp]);
        assert!(examine_file(Path::new(&comp)).is_ok());

        let backed = p("backed.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", &backed]);
        let err = examine_file(Path::new(&backed)).unwrap_err();
        assert!(matches!(&err, Qcow2Error::BackingFile { name } if name.contains("/etc/hostname")));

        let external = p("external.qcow2");
        let opts = format!("data_file={}", p("external.raw"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &external, "4M"]);
        let err = examine_file(Path::new(&external)).unwrap_err();
        assert!(matches!(&err, Qcow2Error::DataFile { name } if name.contains("external.raw")));

        let luks = p("luks.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=hunter2",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            &luks,
            "4M",
        ]);
        let err = examine_file(Path::new(&luks)).unwrap_err();
        assert!(matches!(err, Qcow2Error::Encrypted { method: 2 }), "{err}");

        // Truncating a real image with data makes its tables point past the end.
        let cut = p("cut.qcow2");
        let bytes = std::fs::read(&v2).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 65536]).unwrap();
        let err = examine_file(Path::new(&cut)).unwrap_err();
        assert!(matches!(err, Qcow2Error::OutOfFile { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
