//! The content-addressed image cache.
//!
//! An entry is `<cache-dir>/<sha256>.img`: the image's bytes exactly as
//! downloaded (qcow2 stays compressed), named by their SHA-256. A download
//! goes to `.lvp-<job>.part` in the same directory and becomes an entry
//! only by an atomic rename after the digest matched and the file and the
//! directory were fsynced, so a crash or a mismatch never leaves a file
//! that looks like an entry. Jobs that need the same image at the same time
//! share one download: the first becomes the leader of a [`Flight`], the
//! others wait for it and watch its progress.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const TEMP_PREFIX: &str = ".lvp-";
const TEMP_SUFFIX: &str = ".part";

pub struct Cache {
    dir: PathBuf,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
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
        let cache = Cache { dir: dir.to_path_buf(), flights: Mutex::default() };
        cache.sweep_temp_files()?;
        Ok(cache)
    }

    pub fn entry_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.img"))
    }

    /// The entry for `sha256`, if the cache holds one.
    pub fn lookup(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.entry_path(sha256);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Some(path),
            _ => None,
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

    /// Makes a verified download an entry: data to disk, rename, then the
    /// directory to disk so the rename itself survives a power cut.
    pub fn commit(&self, temp: &Path, file: File, sha256: &str) -> io::Result<PathBuf> {
        file.sync_all()?;
        drop(file);
        let entry = self.entry_path(sha256);
        fs::rename(temp, &entry)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(entry)
    }

    fn sweep_temp_files(&self) -> io::Result<()> {
        for item in fs::read_dir(&self.dir)? {
            let item = item?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
                log::info!("removing leftover download {}", item.path().display());
                fs::remove_file(item.path())?;
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

    #[test]
    fn test_commit_makes_entry_and_open_sweeps_leftovers() {
        let dir = temp_dir("commit");
        let cache = Cache::open(&dir).unwrap();
        let (tmp, file) = cache.temp_file("job1").unwrap();
        fs::write(&tmp, b"abc").unwrap();
        assert!(cache.lookup("d1").is_none());
        let entry = cache.commit(&tmp, file, "d1").unwrap();
        assert_eq!(fs::read(&entry).unwrap(), b"abc");
        assert_eq!(cache.lookup("d1"), Some(entry));
        assert!(!tmp.exists());

        let (left, _) = cache.temp_file("job2").unwrap();
        drop(cache);
        let cache = Cache::open(&dir).unwrap();
        assert!(!left.exists(), "a leftover .part file must be swept at open");
        assert!(cache.lookup("d1").is_some());
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
