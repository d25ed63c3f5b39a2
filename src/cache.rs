//! The content-addressed image cache.
//!
//! An entry is `<cache-dir>/<sha256>.img`: the image's bytes exactly as
//! downloaded (qcow2 stays compressed), named by their SHA-256, with a
//! small `<sha256>.json` beside it that records the size and source. A
//! download goes to `.lvp-<job>.part` in the same directory (zero blocks
//! left as holes) and becomes an entry by an atomic rename once its digest
//! matched, so a mismatch never leaves a file that looks like an entry.
//!
//! The entry's data is flushed to stable storage *after* the rename, on a
//! thread of its own, once the job that downloaded it has flushed its
//! volume (so the two flushes do not share the disk); only then is the
//! record written (and synced). The record is the mark of a durable
//! entry: an entry without one (a power cut came before its flush ended)
//! is hashed again before any use, and deleted when it does not match.
//! Within the running daemon an entry still being flushed is trusted as it
//! is: the page cache holds exactly the bytes that were hashed. Before use
//! an entry's size is checked against its record (its digest too with
//! `--verify-cache`); an entry that fails is deleted and downloaded again. An entry's mtime
//! is its last use, for least-recently-used eviction. Jobs that need the same image at the same time
//! share one download: the first becomes the leader of a [`Flight`], the
//! others wait for it and watch its progress.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const TEMP_PREFIX: &str = ".lvp-";
const TEMP_SUFFIX: &str = ".part";

/// What `<sha256>.json` records about an entry.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct EntryRecord {
    sha256: String,
    size: u64,
    /// The URL it came from, without query string.
    source: String,
}

/// One cache entry, for listing.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub sha256: String,
    /// The URL it came from, without query string.
    pub source: String,
    pub size: u64,
    pub last_used: std::time::SystemTime,
}

/// SHA-256 of a whole file, as lower-case hex.
/// The pending flush of a committed entry: started by [`Flush::start`] or
/// on drop, whichever comes first.
pub struct Flush {
    work: Option<FlushWork>,
}

/// The entry's file, its record to be, the cache directory, and the map
/// of entries being flushed.
type FlushWork = (File, EntryRecord, PathBuf, Arc<Mutex<HashMap<String, EntryRecord>>>);

impl Flush {
    pub fn start(mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        let Some((file, record, dir, flushing)) = self.work.take() else { return };
        let sha256 = record.sha256.clone();
        let map = Arc::clone(&flushing);
        let flush = move || {
            let done = file.sync_all().and_then(|()| write_record(&dir, &record)).and_then(|()| {
                // The entry may have been purged (by the API, or as a
                // refused image) while this ran: a record must not
                // outlive it. Whoever removes the entry removes the
                // record after it, so one of the two sees the other.
                if !dir.join(format!("{}.img", record.sha256)).exists() {
                    log::debug!("cache entry {} went before its record", record.sha256);
                    remove_if_present(&dir.join(format!("{}.json", record.sha256)))?;
                }
                File::open(&dir)?.sync_all()
            });
            flushing.lock().unwrap().remove(&record.sha256);
            match done {
                Ok(()) => log::debug!("cache entry {} is on stable storage", record.sha256),
                Err(e) => log::warn!(
                    "cache entry {}: flush failed ({e}); it will be hashed again before use",
                    record.sha256
                ),
            }
        };
        if let Err(e) = std::thread::Builder::new().name("cache-flush".into()).spawn(flush) {
            map.lock().unwrap().remove(&sha256);
            log::warn!(
                "cannot start the cache flush thread ({e}); entry {sha256} stays unrecorded"
            );
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.spawn();
    }
}

impl EntryRecord {
    fn new(sha256: &str, size: u64, source: &str) -> EntryRecord {
        EntryRecord { sha256: sha256.to_string(), size, source: source.to_string() }
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `<sha256>.json` in `dir` atomically and durably.
fn write_record(dir: &Path, record: &EntryRecord) -> io::Result<()> {
    let temp = dir.join(format!("{TEMP_PREFIX}{}.json{TEMP_SUFFIX}", record.sha256));
    let mut f = File::create(&temp)?;
    f.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
    f.sync_all()?;
    fs::rename(&temp, dir.join(format!("{}.json", record.sha256)))
}

pub fn hash_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::tokens::hex(&hasher.finalize()))
}

pub struct Cache {
    dir: PathBuf,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Entries committed by this daemon whose flush has not ended yet:
    /// digest → its record to be. Trusted by [`Cache::lookup`] without a
    /// record on disk.
    flushing: Arc<Mutex<HashMap<String, EntryRecord>>>,
}

/// One download that several jobs wait for.
#[derive(Default)]
pub struct Flight {
    /// `None` while running; then the digest of the new entry, or `None`
    /// inside when the leader failed (followers then try for themselves).
    outcome: Mutex<Option<Option<String>>>,
    finished: Condvar,
    pub bytes_done: AtomicU64,
    /// `u64::MAX` while the total is unknown.
    pub bytes_total: AtomicU64,
}

/// What joining a flight made of this job.
pub enum Role<'a> {
    Leader(FlightGuard<'a>),
    Follower(Arc<Flight>),
}

/// Held by the job that downloads. Dropping it without [`finish`] tells
/// the followers the download failed.
///
/// [`finish`]: FlightGuard::finish
pub struct FlightGuard<'a> {
    cache: &'a Cache,
    key: String,
    pub flight: Arc<Flight>,
    result: Option<String>,
}

impl FlightGuard<'_> {
    pub fn finish(mut self, digest: String) {
        self.result = Some(digest);
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.cache.flights.lock().unwrap().remove(&self.key);
        *self.flight.outcome.lock().unwrap() = Some(self.result.take());
        self.flight.finished.notify_all();
    }
}

impl Flight {
    /// Waits for the leader, passing its progress to `on_progress`.
    /// Returns the digest it stored, `None` if it failed, or `Err(())` if
    /// this job was cancelled while waiting.
    pub fn wait(
        &self,
        cancel: &AtomicBool,
        on_progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Option<String>, ()> {
        let mut outcome = self.outcome.lock().unwrap();
        loop {
            if let Some(result) = outcome.as_ref() {
                return Ok(result.clone());
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(());
            }
            let total = self.bytes_total.load(Ordering::Relaxed);
            on_progress(
                self.bytes_done.load(Ordering::Relaxed),
                (total != u64::MAX).then_some(total),
            );
            outcome = self.finished.wait_timeout(outcome, Duration::from_millis(200)).unwrap().0;
        }
    }
}

impl Cache {
    /// Opens the cache directory, creating it if needed, and removes
    /// temporary files that an earlier run left behind.
    pub fn open(dir: &Path) -> io::Result<Cache> {
        fs::create_dir_all(dir)?;
        let cache =
            Cache { dir: dir.to_path_buf(), flights: Mutex::default(), flushing: Arc::default() };
        cache.sweep_temp_files()?;
        Ok(cache)
    }

    pub fn entry_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.img"))
    }

    fn record_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.json"))
    }

    /// The entry for `sha256` if the cache holds a sound one. With
    /// `verify`, the entry is hashed again; without, its size is checked
    /// against its record (and an entry without a record is hashed).
    pub fn lookup(&self, sha256: &str, verify: bool) -> Option<PathBuf> {
        let path = self.entry_path(sha256);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            _ => return None,
        };
        let recorded = self.read_record(sha256);
        let sound = match (&recorded, verify) {
            (Some(rec), false) => rec.size == meta.len(),
            _ => hash_file(&path).is_ok_and(|got| got == sha256),
        };
        if !sound {
            log::warn!("cache entry {} is damaged (size or digest); deleting it", path.display());
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(self.record_path(sha256));
            return None;
        }
        if recorded.is_none() {
            let _ = self.write_record(sha256, meta.len(), "unknown (entry re-verified)");
        }
        // Mark the use for LRU eviction; failing that only affects eviction order.
        let _ = File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Some(path)
    }

    /// The entry's record: the one on disk, or the one its flush will
    /// write.
    fn read_record(&self, sha256: &str) -> Option<EntryRecord> {
        if let Some(pending) = self.flushing.lock().unwrap().get(sha256) {
            return Some(pending.clone());
        }
        let text = fs::read(self.record_path(sha256)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_record(&self, sha256: &str, size: u64, source: &str) -> io::Result<()> {
        write_record(&self.dir, &EntryRecord::new(sha256, size, source))
    }

    /// Proves the cache directory still takes files.
    pub fn check_writable(&self) -> io::Result<()> {
        let probe = self.dir.join(format!("{TEMP_PREFIX}ready-probe{TEMP_SUFFIX}"));
        fs::write(&probe, b"")?;
        fs::remove_file(&probe)
    }

    /// Every entry, least recently used first.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let mut out = Vec::new();
        let Ok(items) = fs::read_dir(&self.dir) else { return out };
        for item in items.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".img") else { continue };
            let Ok(meta) = item.metadata() else { continue };
            let source = self.read_record(sha).map(|r| r.source).unwrap_or_default();
            out.push(EntryInfo {
                sha256: sha.to_string(),
                source,
                size: meta.len(),
                last_used: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            });
        }
        out.sort_by_key(|e| e.last_used);
        out
    }

    /// Deletes entry `sha256` and its record. `Ok(false)` if there is none.
    pub fn purge(&self, sha256: &str) -> io::Result<bool> {
        match fs::remove_file(self.entry_path(sha256)) {
            Ok(()) => {
                let _ = fs::remove_file(self.record_path(sha256));
                log::info!("purged cache entry {sha256}");
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes least recently used entries until the cache holds at most
    /// `max_bytes`, never one whose digest is in `keep_digests` or whose
    /// source is in `keep_sources` (images that active jobs need).
    pub fn evict(&self, max_bytes: u64, keep_digests: &[String], keep_sources: &[String]) {
        let mut entries = Vec::new();
        let Ok(items) = fs::read_dir(&self.dir) else { return };
        for item in items.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".img") else { continue };
            let Ok(meta) = item.metadata() else { continue };
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            entries.push((used, meta.len(), sha.to_string()));
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, size, sha) in entries {
            if total <= max_bytes {
                break;
            }
            let source = self.read_record(&sha).map(|r| r.source);
            let needed = keep_digests.contains(&sha)
                || source
                    .is_some_and(|s| keep_sources.iter().any(|k| crate::fetch::redact(k) == s));
            if needed {
                continue;
            }
            match fs::remove_file(self.entry_path(&sha)) {
                Ok(()) => {
                    let _ = fs::remove_file(self.record_path(&sha));
                    total -= size;
                    log::info!(
                        "evicted cache entry {sha} ({size} bytes) to stay under the size limit"
                    );
                }
                Err(e) => log::warn!("could not evict cache entry {sha}: {e}"),
            }
        }
        if total > max_bytes {
            log::warn!("cache holds {total} bytes, over its limit of {max_bytes}: active jobs need the rest");
        }
    }

    /// Joins the download of `key` (the image URL) or becomes its leader.
    pub fn join_flight(&self, key: &str) -> Role<'_> {
        let mut flights = self.flights.lock().unwrap();
        if let Some(flight) = flights.get(key) {
            return Role::Follower(Arc::clone(flight));
        }
        let flight = Arc::new(Flight::default());
        flight.bytes_total.store(u64::MAX, Ordering::Relaxed);
        flights.insert(key.to_string(), Arc::clone(&flight));
        Role::Leader(FlightGuard { cache: self, key: key.to_string(), flight, result: None })
    }

    /// Creates the temporary file a job downloads into.
    pub fn temp_file(&self, job: &str) -> io::Result<(PathBuf, File)> {
        let path = self.dir.join(format!("{TEMP_PREFIX}{job}{TEMP_SUFFIX}"));
        let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok((path, file))
    }

    /// Makes a verified download an entry: the rename at once; the data to
    /// disk, its record, and the directory to disk come later, on a thread
    /// of their own, when the returned [`Flush`] is started or dropped
    /// (see the module doc for why this order is safe). The entry is usable
    /// as soon as this returns. A job holds the flush until its volume is
    /// flushed, so that the two do not share the disk.
    pub fn commit(
        &self,
        temp: &Path,
        file: File,
        sha256: &str,
        source: &str,
    ) -> io::Result<(PathBuf, Flush)> {
        let size = file.metadata()?.len();
        // A record left from an earlier entry of this digest would vouch
        // for the new file before its flush: remove it, durably, first.
        // (Only after a failed delete; not on the usual path.)
        match fs::remove_file(self.record_path(sha256)) {
            Ok(()) => File::open(&self.dir)?.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let entry = self.entry_path(sha256);
        let record = EntryRecord::new(sha256, size, &crate::fetch::redact(source));
        self.flushing.lock().unwrap().insert(sha256.to_string(), record.clone());
        if let Err(e) = fs::rename(temp, &entry) {
            self.flushing.lock().unwrap().remove(sha256);
            return Err(e);
        }
        let flush =
            Flush { work: Some((file, record, self.dir.clone(), Arc::clone(&self.flushing))) };
        Ok((entry, flush))
    }

    /// Waits until every entry this daemon committed is on stable storage
    /// (or its flush failed). For tests and an orderly shutdown.
    pub fn wait_flushed(&self, patience: Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        while !self.flushing.lock().unwrap().is_empty() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn sweep_temp_files(&self) -> io::Result<()> {
        for item in fs::read_dir(&self.dir)? {
            let item = item?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
                log::info!("removing leftover download {}", item.path().display());
                fs::remove_file(item.path())?;
            } else if let Some(sha) = name.strip_suffix(".json") {
                // A record whose entry never arrived (crash before the rename).
                if !self.entry_path(sha).exists() {
                    fs::remove_file(item.path())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lvp-cache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// An entry purged before its flush ran leaves no record behind, and
    /// so nothing that vouches for a file that is gone.
    #[test]
    fn test_entry_purged_before_its_flush_leaves_no_record() {
        let dir = temp_dir("purge-flush");
        let cache = Cache::open(&dir).unwrap();
        let (tmp, file) = cache.temp_file("job1").unwrap();
        fs::write(&tmp, b"abc").unwrap();
        let (entry, flush) = cache.commit(&tmp, file, ABC, "http://h/x").unwrap();
        assert!(cache.purge(ABC).unwrap());
        flush.start();
        assert!(cache.wait_flushed(Duration::from_secs(30)));
        assert!(!entry.exists());
        let left: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(
            left.iter().all(|n| n == ".lvp-lock" || !n.to_string_lossy().contains(ABC)),
            "{left:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_commit_makes_entry_and_open_sweeps_leftovers() {
        let dir = temp_dir("commit");
        let cache = Cache::open(&dir).unwrap();
        let (tmp, file) = cache.temp_file("job1").unwrap();
        fs::write(&tmp, b"abc").unwrap();
        assert!(cache.lookup(ABC, false).is_none());
        let (entry, flush) = cache.commit(&tmp, file, ABC, "http://h/x?sig=1").unwrap();
        flush.start();
        // The record is written on the flush thread; wait for it so that
        // nothing below races with it (the sweep, removing the directory).
        assert!(cache.wait_flushed(Duration::from_secs(30)));
        assert_eq!(fs::read(&entry).unwrap(), b"abc");
        assert_eq!(cache.lookup(ABC, false), Some(entry.clone()));
        assert_eq!(cache.lookup(ABC, true), Some(entry));
        assert!(!tmp.exists());

        let (left, _) = cache.temp_file("job2").unwrap();
        drop(cache);
        let cache = Cache::open(&dir).unwrap();
        assert!(!left.exists(), "a leftover .part file must be swept at open");
        assert!(cache.lookup(ABC, false).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn store(cache: &Cache, job: &str, data: &[u8]) -> String {
        let (tmp, file) = cache.temp_file(job).unwrap();
        fs::write(&tmp, data).unwrap();
        let sha = hash_file(&tmp).unwrap();
        cache.commit(&tmp, file, &sha, &format!("http://h/{job}")).unwrap().1.start();
        assert!(cache.wait_flushed(Duration::from_secs(30)));
        sha
    }

    /// A truncated entry (size no longer matches its record) must never be
    /// used; with --verify-cache a same-size corruption is caught too.
    #[test]
    fn damaged_entries_are_deleted_not_used() {
        let dir = temp_dir("damaged");
        let cache = Cache::open(&dir).unwrap();
        let sha = store(&cache, "a", b"hello world");
        fs::write(cache.entry_path(&sha), b"hello").unwrap();
        assert!(cache.lookup(&sha, false).is_none());
        assert!(!cache.entry_path(&sha).exists());

        let sha = store(&cache, "b", b"hello world");
        fs::write(cache.entry_path(&sha), b"HELLO WORLD").unwrap();
        assert!(cache.lookup(&sha, false).is_some(), "same size passes the cheap check");
        assert!(cache.lookup(&sha, true).is_none(), "the digest check catches it");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_eviction_takes_least_recently_used_and_spares_needed() {
        let dir = temp_dir("evict");
        let cache = Cache::open(&dir).unwrap();
        let old = store(&cache, "old", &[1u8; 1000]);
        let needed = store(&cache, "needed", &[2u8; 1000]);
        let new = store(&cache, "new", &[3u8; 1000]);
        let past = std::time::SystemTime::now() - Duration::from_secs(3600);
        for (sha, age) in [(&needed, 3), (&old, 2), (&new, 1)] {
            let f = File::options().write(true).open(cache.entry_path(sha)).unwrap();
            f.set_modified(past - Duration::from_secs(age)).unwrap();
        }
        cache.evict(2000, &[], &["http://h/needed".to_string()]);
        assert!(!cache.entry_path(&old).exists(), "the oldest entry no job needs goes first");
        assert!(
            cache.entry_path(&needed).exists(),
            "an entry a job needs stays, though it is older"
        );
        assert!(cache.entry_path(&new).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_followers_see_the_leaders_outcome() {
        let dir = temp_dir("flight");
        let cache = Cache::open(&dir).unwrap();
        let no = AtomicBool::new(false);
        let Role::Leader(guard) = cache.join_flight("u") else { panic!("first is leader") };
        let Role::Follower(f) = cache.join_flight("u") else { panic!("second follows") };
        guard.finish("d".into());
        assert_eq!(f.wait(&no, &mut |_, _| {}), Ok(Some("d".into())));

        let Role::Leader(guard) = cache.join_flight("u") else { panic!("flight was released") };
        let Role::Follower(f) = cache.join_flight("u") else { panic!("second follows") };
        drop(guard);
        assert_eq!(
            f.wait(&no, &mut |_, _| {}),
            Ok(None),
            "a failed leader must release its followers"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
