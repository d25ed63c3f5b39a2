//! The job journal: every job's state, persisted so a restart loses none.
//!
//! The file `<state-dir>/jobs.journal` holds JSON lines, one per state
//! change, each a whole [`Job`] record with a per-job sequence number. A
//! line is written and fdatasynced before the change is acknowledged to
//! anyone. Replay keeps each job's highest-numbered record, so records
//! may reach the file slightly out of order without harm, and a torn last
//! line (a crash mid-write) is skipped. When the file holds many more
//! lines than there are jobs, it is rewritten with one line per job into
//! a temporary file that is fsynced and renamed over the old one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Job, JobId};

const FILE_NAME: &str = "jobs.journal";

/// The journal holds image URLs whole, and a presigned URL's query string is
/// a credential, so only the daemon's user may read it.
const FILE_MODE: u32 = 0o600;

fn open_private(path: &Path, new: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    if new {
        options.write(true).create(true).truncate(true);
    } else {
        options.create(true).append(true);
    }
    let file = options.open(path)?;
    // `mode` applies only when the file is created: tighten one left by an
    // older version too.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Rewrite the file once it holds this many lines more than live jobs.
const COMPACT_SLACK: usize = 4096;

/// One line of the journal.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A job's state after a change.
    Job(Box<Job>),
    /// The job was dropped (retention, or never queued).
    Forget { forget: JobId, seq: u64 },
}

impl Record {
    fn key(&self) -> (JobId, u64) {
        match self {
            Record::Job(job) => (job.id, job.seq),
            Record::Forget { forget, seq } => (*forget, *seq),
        }
    }
}

pub struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl Journal {
    /// Reads the journal in `state_dir` (if any) and returns the jobs it
    /// holds, oldest first, with the journal open for appending.
    pub fn open(state_dir: &Path) -> io::Result<(Journal, Vec<Job>)> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let (jobs, lines) = match File::open(&path) {
            Ok(f) => replay(BufReader::new(f))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(e),
        };
        let file = open_private(&path, false)?;
        Ok((Journal { path, file, lines }, jobs))
    }

    /// Appends one record and waits until it is on stable storage.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        self.append_unsynced(record)?;
        self.file.sync_data()
    }

    /// Appends one record without waiting for stable storage: a power cut
    /// may lose it, and the next synced append makes it durable with
    /// itself. For records a restart can do without (a stage change).
    pub fn append_unsynced(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.lines += 1;
        Ok(())
    }

    /// Whether the file has grown enough past `live` jobs to rewrite it.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.lines > live + COMPACT_SLACK
    }

    /// Replaces the file with one record per job in `jobs`.
    pub fn rewrite<'a>(&mut self, jobs: impl Iterator<Item = &'a Job>) -> io::Result<()> {
        let temp = self.path.with_extension("journal.new");
        let mut out = io::BufWriter::new(open_private(&temp, true)?);
        let mut lines = 0;
        for job in jobs {
            serde_json::to_writer(&mut out, &RecordRef::Job(job)).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
            lines += 1;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&temp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = open_private(&self.path, false)?;
        self.lines = lines;
        Ok(())
    }
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum RecordRef<'a> {
    Job(&'a Job),
}

/// Each job's latest record, in the order jobs were first seen, and the
/// number of lines read.
fn replay(reader: impl BufRead) -> io::Result<(Vec<Job>, usize)> {
    let mut order: Vec<JobId> = Vec::new();
    let mut latest: HashMap<JobId, Record> = HashMap::new();
    let mut lines = 0;
    for line in reader.split(b'\n') {
        let line = line?;
        lines += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: Record = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                // Only the last line can be torn by a crash; anything else
                // is damage worth telling the operator about.
                log::warn!("journal line {lines} is unreadable and skipped: {e}");
                continue;
            }
        };
        let (id, seq) = record.key();
        match latest.get(&id) {
            Some(old) if old.key().1 >= seq => {}
            Some(_) => {
                latest.insert(id, record);
            }
            None => {
                order.push(id);
                latest.insert(id, record);
            }
        }
    }
    let jobs = order
        .into_iter()
        .filter_map(|id| match latest.remove(&id) {
            Some(Record::Job(job)) => Some(*job),
            _ => None,
        })
        .collect();
    Ok((jobs, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImageType, JobKind, JobRequest};
    use crate::jobs::Status;

    fn job(volume: &str) -> Job {
        Job::new(
            uuid::Uuid::new_v4(),
            JobRequest {
                kind: JobKind::Provision,
                image_url: "http://h/a.img".into(),
                volume_name: volume.into(),
                volume_size_gb: 1,
                image_type: ImageType::Raw,
                correlation_id: Some("c".into()),
                image_sha256: None,
            },
        )
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lvp-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn test_replay_keeps_latest_record_and_skips_torn_line() {
        let d = dir("replay");
        let (mut j, jobs) = Journal::open(&d).unwrap();
        assert!(jobs.is_empty());
        let mut a = job("a");
        let b = job("b");
        j.append(&Record::Job(Box::new(a.clone()))).unwrap();
        j.append(&Record::Job(Box::new(b.clone()))).unwrap();
        a.seq = 3;
        a.status = Status::Completed;
        let newer = a.clone();
        a.seq = 2;
        a.status = Status::Running;
        // A stale record written after a newer one must not win.
        j.append(&Record::Job(Box::new(newer))).unwrap();
        j.append(&Record::Job(Box::new(a.clone()))).unwrap();
        j.append(&Record::Forget { forget: b.id, seq: 9 }).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(d.join(FILE_NAME)).unwrap();
        f.write_all(b"{\"id\":\"torn").unwrap();

        let (_, jobs) = Journal::open(&d).unwrap();
        assert_eq!(jobs.len(), 1, "b was forgotten");
        assert_eq!(jobs[0].id, a.id);
        assert_eq!(jobs[0].status, Status::Completed);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_rewrite_keeps_one_line_per_job() {
        let d = dir("rewrite");
        let (mut j, _) = Journal::open(&d).unwrap();
        let mut a = job("a");
        for seq in 0..10 {
            a.seq = seq;
            j.append(&Record::Job(Box::new(a.clone()))).unwrap();
        }
        j.rewrite([&a].into_iter()).unwrap();
        let text = fs::read_to_string(d.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 1);
        j.append(&Record::Job(Box::new(job("b")))).unwrap();
        let (_, jobs) = Journal::open(&d).unwrap();
        assert_eq!(jobs.len(), 2);
        fs::remove_dir_all(&d).unwrap();
    }

    /// The journal once was world-readable, and with it the signature in
    /// every presigned image URL.
    #[test]
    fn journal_is_readable_by_its_owner_only() {
        let d = dir("mode");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(FILE_NAME), b"").unwrap();
        fs::set_permissions(d.join(FILE_NAME), fs::Permissions::from_mode(0o644)).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let (mut j, _) = Journal::open(&d).unwrap();
        assert_eq!(mode(&d.join(FILE_NAME)), 0o600, "an existing journal is tightened");
        j.rewrite([&job("a")].into_iter()).unwrap();
        assert_eq!(mode(&d.join(FILE_NAME)), 0o600, "a rewritten journal stays private");
        fs::remove_dir_all(&d).unwrap();
    }
}
