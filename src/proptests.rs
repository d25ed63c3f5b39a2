//! Short property runs (proptest) over everything that reads bytes a
//! remote party chose: the provision body, job ids in paths, `.sha256`
//! sidecars, qcow2 headers, and the front door's request-head framing.
//! Each property holds for every input: no panic, and a few invariants
//! that a bug in the parser would break. `.ci/run` runs them with
//! `PROPTEST_CASES` set, so the run stays under a minute.

use std::io::Cursor;

use proptest::prelude::*;

use crate::api::{check_volume_name, parse_provision};
use crate::fetch::parse_sidecar;
use crate::frontdoor::framing::{Framer, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use crate::http::routes::job_id;
use crate::qcow2;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A sound version 3 qcow2 image (the same layout as the unit tests use),
/// to mutate.
fn sound_qcow2() -> Vec<u8> {
    let mut img = vec![0u8; 3 * 65536];
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(&mut img, 0, &qcow2::MAGIC);
    put(&mut img, 4, &3u32.to_be_bytes());
    put(&mut img, 20, &16u32.to_be_bytes());
    put(&mut img, 24, &(1u64 << 20).to_be_bytes());
    put(&mut img, 36, &1u32.to_be_bytes());
    put(&mut img, 40, &(2u64 * 65536).to_be_bytes());
    put(&mut img, 48, &65536u64.to_be_bytes());
    put(&mut img, 56, &1u32.to_be_bytes());
    put(&mut img, 96, &4u32.to_be_bytes());
    put(&mut img, 100, &112u32.to_be_bytes());
    img
}

/// JSON values a client might send for a field: every type, odd strings.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,80}".prop_map(serde_json::Value::from),
        "(https?|ftp|file)://[a-z0-9.:@\\[\\]-]{0,20}/[ -~]{0,40}"
            .prop_map(serde_json::Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn provision_body_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_provision(&body);
    }

    /// Any object with the known fields of any type: a request that is
    /// accepted names a volume that is safe as a file name.
    #[test]
    fn accepted_provision_bodies_are_safe(
        url in json_value(),
        name in prop_oneof![json_value(), "[a-zA-Z0-9+_.-]{1,70}".prop_map(serde_json::Value::from)],
        size in json_value(),
        kind in prop_oneof![json_value(), Just(serde_json::json!("qcow2")), Just(serde_json::json!("raw"))],
        corr in json_value(),
        extra in proptest::option::of(("[a-z_]{1,12}", json_value())),
    ) {
        let mut body = serde_json::json!({
            "image_url": url, "volume_name": name, "volume_size_gb": size,
            "image_type": kind, "correlation_id": corr,
        });
        if let Some((k, v)) = extra {
            body[k] = v;
        }
        if let Ok(req) = parse_provision(body.to_string().as_bytes()) {
            prop_assert!(check_volume_name(&req.volume_name).is_ok());
            prop_assert!(!req.volume_name.contains('/'));
            prop_assert!(req.volume_bytes() > 0);
        }
    }

    #[test]
    fn job_ids_are_uuids_or_400(text in "\\PC{0,80}|[0-9a-fA-F-]{30,40}") {
        match job_id(&text) {
            Ok(id) => prop_assert_eq!(uuid::Uuid::parse_str(&text).unwrap(), id),
            Err(e) => {
                prop_assert_eq!(e.status, 400);
                prop_assert!(!e.details.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn sidecar_parsing_yields_a_digest_or_a_reason(text in "\\PC{0,300}|([0-9a-f]{64}( [ *]?[a-z.]{0,12})?\n){0,4}") {
        if let Ok(hex) = parse_sidecar(&text, "image.qcow2") {
            prop_assert_eq!(hex.len(), 64);
            prop_assert!(hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn qcow2_reader_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = qcow2::examine(&mut Cursor::new(&bytes), bytes.len() as u64);
    }

    /// A sound image with a few header bytes changed at random: the reader
    /// never panics, and whatever it accepts has no backing file, no
    /// encryption and only known feature bits.
    #[test]
    fn qcow2_reader_on_mutated_headers(
        edits in proptest::collection::vec((0usize..512, any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..3 * 65536),
    ) {
        let mut img = sound_qcow2();
        for (at, byte) in edits {
            img[at] = byte;
        }
        if let Some(len) = cut {
            img.truncate(len);
        }
        if let Ok(h) = qcow2::examine(&mut Cursor::new(&img), img.len() as u64) {
            prop_assert!(h.version == 2 || h.version == 3);
            prop_assert!(h.incompatible_features & !0x1d == 0, "{:#x}", h.incompatible_features);
            prop_assert_eq!(&img[8..20], &[0u8; 12][..], "accepted a backing file");
            prop_assert_eq!(&img[32..36], &[0u8; 4][..], "accepted encryption");
            prop_assert!(h.l1_offset + h.l1_entries * 8 <= img.len() as u64);
        }
    }

    /// The framer passes through exactly a prefix of its input, the same
    /// however the input is split, never more than one head's worth held
    /// back, and never panics.
    #[test]
    fn framing_is_split_invariant(
        stream in proptest::collection::vec(prop_oneof![
            Just(b"GET / HTTP/1.1\r\n".to_vec()),
            Just(b"POST /api/v1/provision HTTP/1.1\r\n".to_vec()),
            Just(b"Content-Length: 3\r\n".to_vec()),
            Just(b"content-length: 70000\r\n".to_vec()),
            Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"abc".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(vec![b'x'; MAX_HEAD_BYTES / 2]),
        ], 0..24).prop_map(|parts| parts.concat()),
        split in proptest::collection::vec(1usize..5000, 0..10),
    ) {
        let mut whole_out = Vec::new();
        let whole = Framer::default().feed(&stream, &mut whole_out);
        let mut framer = Framer::default();
        let mut pieces_out = Vec::new();
        let mut rest = &stream[..];
        let mut pieces = Ok(());
        for n in split.iter().copied().chain(std::iter::repeat(usize::MAX)) {
            if rest.is_empty() || pieces.is_err() {
                break;
            }
            let n = n.min(rest.len());
            pieces = framer.feed(&rest[..n], &mut pieces_out);
            rest = &rest[n..];
        }
        prop_assert_eq!(whole.is_ok(), pieces.is_ok());
        if let (Err(a), Err(b)) = (&whole, &pieces) {
            prop_assert_eq!(a.status, b.status);
            prop_assert!((400..500).contains(&a.status));
        }
        if whole.is_ok() {
            prop_assert_eq!(&whole_out, &pieces_out);
            prop_assert!(stream.starts_with(&whole_out));
            prop_assert!(stream.len() - whole_out.len() <= MAX_HEAD_BYTES + MAX_BODY_BYTES);
        }
    }
}
