//! Images made to harm the host: a qcow2 that names a host file as its
//! backing or data file (as a path or a `json:` description), an
//! encrypted one, truncated or corrupt ones, a "qcow2" that is not one,
//! and a raw image that starts with a qcow2 header. qemu-img 10 converts
//! the first kinds with exit status 0, copying the host file or zeros, so
//! the daemon must refuse them itself. Each refused job must fail at
//! `inspecting` with the reason, create no volume, write no byte of the
//! host file anywhere, and leave no cache entry.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A recognisable "host secret" (`/etc/shadow` stands in for it).
const SECRET: &[u8] = b"HOST-SECRET-b81f0e-MUST-NOT-LEAK\n";

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A qcow2 with 3 MiB of real data, so that it has L2 tables and data
/// clusters to damage.
fn qcow2_with_data(dir: &Path, name: &str) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    fs::write(&raw, pseudo_random(3 * MIB as usize, 7)).unwrap();
    let out = dir.join(name);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&out));
    fs::remove_file(&raw).unwrap();
    out
}

/// One hostile image: its file name in the image directory, the declared
/// type, and words the job's error must contain.
struct Case {
    image: &'static str,
    image_type: &'static str,
    words: Vec<String>,
}

#[test]
fn hostile_images_are_refused_before_any_volume_exists_and_leave_no_cache_entry() {
    if !have_command("qemu-img") {
        assert!(std::env::var_os("CI").is_none(), "qemu-img is missing and CI is set");
        eprintln!("skipping hostile_images: qemu-img not found");
        return;
    }
    let h = Harness::start("hostile-images", &[]);
    let images = h.image_dir().to_path_buf();
    let host = h.dir.mkdir("host");
    let secret = host.join("secret.raw");
    fs::write(&secret, SECRET.repeat(MIB as usize / SECRET.len())).unwrap();
    let secret_s = secret.display().to_string();
    let img = |n: &str| images.join(n).display().to_string();
    let mut cases = Vec::new();

    // 1. A backing file that is a host file.
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &secret_s, &img("backing.qcow2")]);
    cases.push(Case {
        image: "backing.qcow2",
        image_type: "qcow2",
        words: vec!["backing file".into(), secret_s.clone()],
    });

    // 2. The same through a json: backing name, which no path check sees.
    let json =
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret_s}"}}}}"#);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        &json,
        &img("json.qcow2"),
        "1M",
    ]);
    cases.push(Case {
        image: "json.qcow2",
        image_type: "qcow2",
        words: vec!["backing file".into(), "json:".into(), "secret.raw".into()],
    });

    // 3. An external data file (raw): the qcow2's disk IS the host file.
    let data = host.join("data.raw");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &img("datafile.qcow2"), "1M"]);
    fs::copy(&secret, &data).unwrap();
    cases.push(Case {
        image: "datafile.qcow2",
        image_type: "qcow2",
        words: vec!["external file".into(), "data.raw".into()],
    });

    // 4. Encrypted with LUKS.
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=letmein",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        &img("luks.qcow2"),
        "4M",
    ]);
    cases.push(Case { image: "luks.qcow2", image_type: "qcow2", words: vec!["encrypted".into()] });

    // 5. Truncated: the last clusters of a qcow2 with data are cut off.
    let full = qcow2_with_data(&images, "full.qcow2");
    let bytes = fs::read(&full).unwrap();
    fs::write(images.join("truncated.qcow2"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    cases.push(Case {
        image: "truncated.qcow2",
        image_type: "qcow2",
        words: vec!["past the end of the file".into()],
    });

    // 6. An L1 entry that points past the end of the file.
    let mut l1_bad = bytes.clone();
    let l1 = be64(&bytes, 40) as usize;
    l1_bad[l1..l1 + 8].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes());
    fs::write(images.join("l1-past-eof.qcow2"), &l1_bad).unwrap();
    cases.push(Case {
        image: "l1-past-eof.qcow2",
        image_type: "qcow2",
        words: vec!["L2 table".into(), "past the end".into()],
    });

    // 7. Corrupt in a way only qemu-img check sees: two L2 entries share
    //    one data cluster (a refcount error), every offset inside the file.
    let mut shared = bytes.clone();
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let first = be64(&bytes, l2);
    shared[l2 + 8..l2 + 16].copy_from_slice(&first.to_be_bytes());
    fs::write(images.join("shared-cluster.qcow2"), &shared).unwrap();
    cases.push(Case {
        image: "shared-cluster.qcow2",
        image_type: "qcow2",
        words: vec!["qemu-img check found the image corrupt".into()],
    });

    // 8. Declared qcow2, but raw bytes.
    fs::write(images.join("not-qcow2.img"), SECRET.repeat(1000)).unwrap();
    cases.push(Case {
        image: "not-qcow2.img",
        image_type: "qcow2",
        words: vec!["not a qcow2 image".into()],
    });

    for (n, case) in cases.iter().enumerate() {
        write_sidecar(&images.join(case.image));
        let volume = format!("vm-hostile-{n}");
        let id = h.api.submit(&h.request(case.image, &volume, 1, case.image_type));
        let status = h.api.wait_final(&id, JOB_TIMEOUT);
        assert_eq!(status["status"], "failed", "{}: {status:#}", case.image);
        assert_eq!(status["progress"]["stage"], "inspecting", "{}: {status:#}", case.image);
        let error = status["error"].as_str().unwrap();
        for w in &case.words {
            assert!(
                error.contains(w.as_str()),
                "{}: error should mention {w:?}: {error}",
                case.image
            );
        }
        assert!(error.contains("cache entry was deleted"), "{}: {error}", case.image);
        assert!(!h.daemon.volume(&volume).exists(), "{}: a volume was created", case.image);
        assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new(), "{}", case.image);
    }
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());

    // A second job for a refused image downloads it again and refuses it
    // again: nothing from the first attempt was trusted.
    let before = h.images.gets("backing.qcow2");
    let id = h.api.submit(&h.request("backing.qcow2", "vm-again", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["progress"]["stage"], "inspecting", "{status:#}");
    assert_eq!(h.images.gets("backing.qcow2"), before + 1);

    // A size refusal is about the request, not the image: the entry stays.
    let big = images.join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &big.display().to_string(), "2G"]);
    write_sidecar(&big);
    let id = h.api.submit(&h.request("big.qcow2", "vm-big", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["progress"]["stage"], "inspecting", "{status:#}");
    assert_eq!(cache_files(&h.daemon.cache_dir).len(), 1, "{status:#}");

    // No byte of any host file reached anything the daemon wrote.
    for dir in [&h.daemon.volume_dir, &h.daemon.cache_dir] {
        for name in list_dir(dir) {
            let p = dir.join(&name);
            if p.is_file() {
                assert!(!file_contains(&p, SECRET), "host secret leaked into {}", p.display());
            }
        }
    }
    let log = h.daemon.log_text();
    assert!(log.contains("qemu-img check"), "check ran and was logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The declared format wins: a raw image whose first bytes are a qcow2
/// header (one that names a host file as backing) is copied byte for byte
/// and never read as qcow2.
#[test]
fn raw_image_that_starts_with_a_qcow2_header_is_copied_as_raw_bytes() {
    if !have_command("qemu-img") {
        assert!(std::env::var_os("CI").is_none(), "qemu-img is missing and CI is set");
        eprintln!("skipping raw_image_that_starts_with_a_qcow2_header: qemu-img not found");
        return;
    }
    let h = Harness::start("raw-looks-qcow2", &[]);
    let secret = h.dir.mkdir("host").join("secret.raw");
    fs::write(&secret, SECRET.repeat(MIB as usize / SECRET.len())).unwrap();
    let disguised = h.image_dir().join("disguised.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&disguised));
    // Pad to whole sectors, as any raw disk is.
    let mut f = fs::OpenOptions::new().append(true).open(&disguised).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all(&vec![0xa5; (4096 - len % 4096) as usize]).unwrap();
    drop(f);
    write_sidecar(&disguised);

    let id = h.api.submit(&h.request("disguised.raw", "vm-disguised", 1, "raw"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    let volume = h.daemon.volume("vm-disguised");
    // Byte for byte the file, zeros after it: so no byte of the backing file.
    assert_volume_holds(&volume, &disguised, GIB);
    let mut head = [0u8; 4];
    fs::File::open(&volume).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head, b"QFI\xfb");
}

/// A reused volume larger than the image loses what lay past the image:
/// here an old backup GPT header in the last sectors, which a later
/// partitioning tool would otherwise find and trust.
#[test]
fn reused_larger_volume_loses_its_old_backup_gpt() {
    let h = Harness::start("stale-tail", &[]);
    fs::create_dir_all(&h.daemon.volume_dir).unwrap();
    let volume = h.daemon.volume("vm-reused");
    let old = fs::File::create(&volume).unwrap();
    old.set_len(GIB).unwrap();
    let gpt = b"EFI PART\x00\x00\x01\x00\x5c\x00\x00\x00PREVIOUS-TENANT-GPT";
    let mut w = &old;
    w.seek(SeekFrom::Start(GIB - 512)).unwrap();
    w.write_all(gpt).unwrap();
    w.seek(SeekFrom::Start(GIB - 33 * 512)).unwrap();
    w.write_all(b"PREVIOUS-TENANT-PARTITION-ENTRIES").unwrap();
    old.sync_all().unwrap();
    drop(old);
    assert!(tail_holds(&volume, b"PREVIOUS-TENANT"));

    let image = h.image_dir().join("small.raw");
    fs::write(&image, pseudo_random(4 * MIB as usize, 3)).unwrap();
    write_sidecar(&image);
    let id = h.api.submit(&h.request("small.raw", "vm-reused", 1, "raw"));
    let status: Value = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert!(!tail_holds(&volume, b"PREVIOUS-TENANT"), "the stale tail survived");
    assert_volume_holds(&volume, &image, GIB);
}

/// Whether the last 64 KiB of `path` contain `needle`.
fn tail_holds(path: &Path, needle: &[u8]) -> bool {
    let mut f = fs::File::open(path).unwrap();
    let mut tail = vec![0u8; 65536];
    f.seek(SeekFrom::End(-65536)).unwrap();
    f.read_exact(&mut tail).unwrap();
    tail.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cache_entry_swapped_for_a_hostile_qcow2_after_inspection_is_refused() {
    // Inspection verdicts are remembered per digest; an entry's bytes are
    // checked only by size at each use. A same-size swap in the cache (a
    // disk error, or someone with write access) must still not get a
    // backing file past the daemon.
    let h = Harness::start("hostile-swap", &[]);
    let good = qcow2_with_data(h.image_dir(), "good.qcow2");
    write_sidecar(&good);
    let id = h.api.submit(&h.request("good.qcow2", "vm-good", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    let entry = std::path::PathBuf::from(status["image_path"].as_str().unwrap());
    let size = fs::metadata(&entry).unwrap().len();

    let host = h.dir.mkdir("host");
    let secret = host.join("secret.raw");
    fs::write(&secret, SECRET.repeat(MIB as usize / SECRET.len())).unwrap();
    let hostile = host.join("hostile.qcow2");
    let (secret_s, hostile_s) = (secret.display().to_string(), hostile.display().to_string());
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &secret_s, &hostile_s, "8M"]);
    let mut bytes = fs::read(&hostile).unwrap();
    assert!(bytes.len() as u64 <= size, "the hostile image must fit the good one's size");
    bytes.resize(size as usize, 0);
    fs::write(&entry, &bytes).unwrap();

    let id = h.api.submit(&h.request("good.qcow2", "vm-swapped", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    assert_eq!(status["progress"]["stage"], "inspecting", "{status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("backing file"), "{error}");
    assert!(!h.daemon.volume("vm-swapped").exists(), "a volume was created");
    assert!(!entry.exists(), "the swapped entry must be deleted");
}

/// `qemu-img convert` parses the image again after our checks, so it too
/// runs under address-space and CPU limits (a crafted image that slipped
/// through must not make it allocate or spin without end). A `qemu-img`
/// first on the daemon's PATH records the limits it was started with,
/// then runs the real one.
#[test]
fn qemu_img_convert_runs_under_limits() {
    let dir = TestDir::new("convert-limits");
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let img = build_fs_image(images.root(), "base", 51);
    let real =
        String::from_utf8(run(Command::new("sh").args(["-c", "command -v qemu-img"])).stdout)
            .unwrap()
            .trim()
            .to_string();
    let bin = dir.mkdir("bin");
    let record = dir.join("convert-limits.txt");
    let wrapper = format!(
        "#!/bin/sh\nif [ \"$1\" = convert ]; then cat /proc/$$/limits > '{}'; fi\nexec '{real}' \"$@\"\n",
        record.display()
    );
    fs::write(bin.join("qemu-img"), wrapper).unwrap();
    run(Command::new("chmod").arg("+x").arg(bin.join("qemu-img")));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let daemon = Daemon::start_env(&dir, &pki, &[], &[("PATH", &path)]);
    let api = Api::mtls(&daemon, &pki);
    let id = api.submit(&serde_json::json!({
        "image_url": images.url(&img.qcow2_name()),
        "volume_name": "vm-limited",
        "volume_size_gb": 2,
        "image_type": "qcow2",
    }));
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_volume_holds(&daemon.volume("vm-limited"), &img.raw, 2 * GIB);

    let limits = fs::read_to_string(&record).expect("the convert ran through the wrapper");
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line[name.len()..].split_whitespace().take(2).map(String::from).collect()
    };
    // 2 GiB of address space; a minute of CPU plus 10 s per GiB of volume.
    assert_eq!(limit("Max address space"), ["2147483648", "2147483648"], "{limits}");
    assert_eq!(limit("Max cpu time"), ["80", "80"], "{limits}");
}
