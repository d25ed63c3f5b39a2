//! The job table: every job the daemon knows, behind one mutex, and the
//! journal that makes it survive restarts.
//!
//! Handlers and workers hold the table lock only to copy or change a job,
//! never across I/O. A change that matters after a restart (submission,
//! start, volume marks, the final state) is journaled before the caller
//! goes on; progress is not. Journal writes happen outside the table lock,
//! so a slow disk never delays a status request; per-job sequence numbers
//! keep replay correct whatever order the lines land in. Lock order:
//! journal, then table; never the reverse.
//!
//! Finished jobs are kept up to a count and an age, oldest dropped first,
//! so memory and the journal do not grow with the daemon's age.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use super::journal::{Journal, Record};
use super::{Idempotency, Job, JobId, JobView, Stage, Status};
use crate::api::{JobKind, JobRequest};
use crate::error::ApiError;

/// How long and how many finished jobs stay answerable.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_finished: usize,
    pub max_age: Duration,
}

pub struct JobTable {
    inner: Mutex<Inner>,
    /// Notified whenever a job's status or stage changes (for `?wait=`).
    changed: Condvar,
    journal: Mutex<Journal>,
    retention: Retention,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Job>,
    /// Finished jobs, oldest first, for retention.
    finished: VecDeque<JobId>,
    idempotency: HashMap<String, JobId>,
}

/// What `cancel` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The job had not started; it is now `cancelled`.
    WhilePending,
    /// The job is running; the worker stops it and rolls it back.
    Requested,
}

/// What `insert` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// A new pending job.
    New(JobId),
    /// The same request was submitted before with this `Idempotency-Key`.
    Existing(JobId),
}

impl JobTable {
    /// Opens the journal in `state_dir` and loads every job in it. Returns
    /// the table and the jobs that were pending or running when the
    /// previous daemon stopped: the caller undoes their work and marks them
    /// failed with [`JobTable::recover`].
    pub fn open(state_dir: &Path, retention: Retention) -> io::Result<(JobTable, Vec<Job>)> {
        let (journal, jobs) = Journal::open(state_dir)?;
        let mut inner = Inner::default();
        let mut interrupted = Vec::new();
        let mut finished: Vec<(SystemTime, JobId)> = Vec::new();
        for job in jobs {
            if job.status.is_final() {
                finished.push((job.finished_at.unwrap_or(job.created_at), job.id));
            } else {
                interrupted.push(job.clone());
            }
            if let Some(idem) = &job.idempotency {
                inner.idempotency.insert(idem.key.clone(), job.id);
            }
            inner.jobs.insert(job.id, job);
        }
        finished.sort();
        inner.finished = finished.into_iter().map(|(_, id)| id).collect();
        let table = JobTable {
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            journal: Mutex::new(journal),
            retention,
        };
        let dropped = table.prune();
        table.compact(true);
        if dropped > 0 {
            log::info!("dropped {dropped} finished jobs past retention");
        }
        Ok((table, interrupted))
    }

    /// Journals `record`; on failure the change stands in memory only.
    fn persist(&self, record: Record) -> io::Result<()> {
        self.persist_as(record, true)
    }

    /// Journals `record`, waiting for stable storage only when `durable`.
    fn persist_as(&self, record: Record, durable: bool) -> io::Result<()> {
        let mut journal = self.journal.lock().unwrap();
        if durable {
            journal.append(&record)?;
        } else {
            journal.append_unsynced(&record)?;
        }
        let live = self.inner.lock().unwrap().jobs.len();
        if journal.wants_compaction(live) {
            drop(journal);
            self.compact(false);
        }
        Ok(())
    }

    /// Rewrites the journal with one line per job (always when `force`).
    fn compact(&self, force: bool) {
        let mut journal = self.journal.lock().unwrap();
        let inner = self.inner.lock().unwrap();
        if !force && !journal.wants_compaction(inner.jobs.len()) {
            return;
        }
        let mut jobs: Vec<&Job> = inner.jobs.values().collect();
        jobs.sort_by_key(|j| j.created_at);
        if let Err(e) = journal.rewrite(jobs.into_iter()) {
            log::error!(
                "could not rewrite the job journal: {e}; it keeps growing until this works"
            );
        }
    }

    /// Changes a job under the lock and returns its new record.
    fn change(&self, id: JobId, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(&id)?;
        f(job);
        job.seq += 1;
        let record = job.clone();
        drop(inner);
        self.changed.notify_all();
        Some(record)
    }

    fn persist_or_log(&self, job: Option<Job>) {
        if let Some(job) = job {
            let id = job.id;
            if let Err(e) = self.persist(Record::Job(Box::new(job))) {
                log::error!("could not journal job {id}: {e}; a restart may not know its state");
            }
        }
    }

    /// Adds a pending job, journaled before this returns. Refuses a second
    /// active job for the same volume, and returns the earlier job for a
    /// repeated `Idempotency-Key` with the same request.
    pub fn insert(
        &self,
        request: JobRequest,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted, ApiError> {
        let record = {
            let mut inner = self.inner.lock().unwrap();
            if let Some(idem) = &idempotency {
                if let Some(&earlier) = inner.idempotency.get(&idem.key) {
                    let same =
                        inner.jobs.get(&earlier).and_then(|j| j.idempotency.as_ref()) == Some(idem);
                    return if same {
                        Ok(Submitted::Existing(earlier))
                    } else {
                        Err(ApiError::idempotency_conflict(format!(
                            "Idempotency-Key {:?} was used for job {earlier} with a different request",
                            idem.key
                        )))
                    };
                }
            }
            if let Some(other) = inner.jobs.values().find(|j| {
                !j.status.is_final()
                    && request.kind == JobKind::Provision
                    && j.request.kind == JobKind::Provision
                    && j.request.volume_name == request.volume_name
            }) {
                return Err(ApiError::volume_busy(format!(
                    "volume {} already has an active job {}; wait for it or cancel it",
                    request.volume_name, other.id
                )));
            }
            let id = uuid::Uuid::new_v4();
            let mut job = Job::new(id, request);
            job.seq = 1;
            job.idempotency = idempotency.clone();
            if let Some(idem) = idempotency {
                inner.idempotency.insert(idem.key, id);
            }
            inner.jobs.insert(id, job.clone());
            job
        };
        let id = record.id;
        if let Err(e) = self.persist(Record::Job(Box::new(record))) {
            self.forget(id);
            return Err(ApiError::internal(format!(
                "could not record the job in the state directory: {e}"
            )));
        }
        Ok(Submitted::New(id))
    }

    /// Drops a job that never got into the queue.
    pub fn discard(&self, id: JobId) {
        self.forget(id);
        if let Err(e) = self.persist(Record::Forget { forget: id, seq: u64::MAX }) {
            log::error!("could not journal dropping job {id}: {e}");
        }
    }

    fn forget(&self, id: JobId) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(job) = inner.jobs.remove(&id) {
            if let Some(idem) = job.idempotency {
                inner.idempotency.remove(&idem.key);
            }
        }
    }

    /// The job once its status or stage differs from `seen`, or as it is
    /// when `timeout` passes; at once if it already differs or is final.
    pub fn wait_for_change(&self, id: JobId, timeout: Duration) -> Option<JobView> {
        let deadline = std::time::Instant::now() + timeout;
        let mut inner = self.inner.lock().unwrap();
        let seen = inner.jobs.get(&id).map(|j| (j.status, j.progress.stage))?;
        loop {
            let job = inner.jobs.get(&id)?;
            let now = (job.status, job.progress.stage);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if now != seen || job.status.is_final() || left.is_zero() {
                return Some(job.view());
            }
            inner = self.changed.wait_timeout(inner, left).unwrap().0;
        }
    }

    /// Jobs matching the filters, newest first, at most `limit`.
    pub fn list(
        &self,
        status: Option<Status>,
        correlation_id: Option<&str>,
        limit: usize,
    ) -> Vec<JobView> {
        let inner = self.inner.lock().unwrap();
        let mut jobs: Vec<&Job> = inner
            .jobs
            .values()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .filter(|j| correlation_id.is_none_or(|c| j.correlation_id() == c))
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at));
        jobs.into_iter().take(limit).map(Job::view).collect()
    }

    /// Counts of jobs by status, for metrics.
    pub fn counts(&self) -> HashMap<Status, usize> {
        let inner = self.inner.lock().unwrap();
        let mut counts = HashMap::new();
        for job in inner.jobs.values() {
            *counts.entry(job.status).or_insert(0) += 1;
        }
        counts
    }

    pub fn view(&self, id: JobId) -> Option<JobView> {
        self.inner.lock().unwrap().jobs.get(&id).map(Job::view)
    }

    pub fn correlation_id(&self, id: JobId) -> Option<String> {
        self.inner.lock().unwrap().jobs.get(&id).map(Job::correlation_id)
    }

    /// The ids of jobs that are pending or running.
    pub fn active(&self) -> Vec<(JobId, Status)> {
        let inner = self.inner.lock().unwrap();
        inner.jobs.values().filter(|j| !j.status.is_final()).map(|j| (j.id, j.status)).collect()
    }

    /// Image digests and URLs that pending or running jobs may need.
    pub fn images_in_use(&self) -> (Vec<String>, Vec<String>) {
        let inner = self.inner.lock().unwrap();
        let active = inner.jobs.values().filter(|j| !j.status.is_final());
        let mut digests = Vec::new();
        let mut urls = Vec::new();
        for job in active {
            digests.extend(job.image_sha256.clone());
            digests.extend(job.request.image_sha256.clone());
            urls.push(job.request.image_url.clone());
        }
        (digests, urls)
    }

    pub fn cancel(&self, id: JobId) -> Result<Cancelled, ApiError> {
        self.cancel_with(id, "cancelled before it started")
    }

    /// Cancels job `id`; a pending job records `reason` as its error.
    pub fn cancel_with(&self, id: JobId, reason: &str) -> Result<Cancelled, ApiError> {
        self.cancel_because(id, reason, None)
    }

    /// Stops a running job because the daemon is shutting down; its error
    /// will say so instead of blaming a caller.
    pub fn cancel_for_shutdown(&self, id: JobId) {
        let _ = self.cancel_because(
            id,
            "the daemon shut down before the job started",
            Some("cancelled: the daemon shut down and --shutdown-grace ran out"),
        );
    }

    /// Why a running job was stopped, if not by a caller's cancel.
    pub fn cancel_reason(&self, id: JobId) -> Option<String> {
        self.inner.lock().unwrap().jobs.get(&id).and_then(|j| j.cancel_reason.clone())
    }

    fn cancel_because(
        &self,
        id: JobId,
        reason: &str,
        running_reason: Option<&str>,
    ) -> Result<Cancelled, ApiError> {
        let mut outcome = None;
        let record = self.change(id, |job| match job.status {
            Status::Pending => {
                job.cancel.store(true, Ordering::SeqCst);
                job.status = Status::Cancelled;
                job.error = Some(reason.to_string());
                job.finished_at = Some(SystemTime::now());
                outcome = Some(Ok(Cancelled::WhilePending));
            }
            Status::Running => {
                if let Some(why) = running_reason {
                    job.cancel_reason = Some(why.to_string());
                }
                job.cancel.store(true, Ordering::SeqCst);
                outcome = Some(Ok(Cancelled::Requested));
            }
            done => {
                outcome = Some(Err(ApiError::job_finished(format!(
                    "job {id} is already {}; nothing to cancel",
                    done.as_str()
                ))))
            }
        });
        let outcome = outcome.unwrap_or_else(|| Err(ApiError::not_found(format!("no job {id}"))));
        if outcome == Ok(Cancelled::WhilePending) {
            self.inner.lock().unwrap().finished.push_back(id);
            self.persist_or_log(record);
        }
        outcome
    }

    /// Moves a pending job to running and hands the worker what it needs.
    /// `None` when the job was cancelled (or forgotten) while it waited.
    pub fn start(&self, id: JobId) -> Option<(JobRequest, Arc<AtomicBool>)> {
        let mut started = None;
        let record = self.change(id, |job| {
            if job.status == Status::Pending {
                job.status = Status::Running;
                job.started_at = Some(SystemTime::now());
                started = Some((job.request.clone(), Arc::clone(&job.cancel)));
            }
        });
        started.as_ref()?;
        // Not waited for: a restart treats a pending and a running job
        // alike (failed, undone by its volume mark), so this record only
        // makes its message more precise. One fdatasync less a job.
        if let Some(job) = record {
            if let Err(e) = self.persist_as(Record::Job(Box::new(job)), false) {
                log::error!("could not journal job {id}: {e}; a restart may not know its state");
            }
        }
        started
    }

    /// Changes fields of a job that need not survive a restart.
    pub fn update(&self, id: JobId, f: impl FnOnce(&mut Job)) {
        if let Some(job) = self.inner.lock().unwrap().jobs.get_mut(&id) {
            f(job);
        }
    }

    /// Changes fields of a job and journals them before returning.
    pub fn update_durably(&self, id: JobId, f: impl FnOnce(&mut Job)) -> io::Result<()> {
        match self.change(id, f) {
            Some(job) => self.persist(Record::Job(Box::new(job))),
            None => Ok(()),
        }
    }

    /// Changes fields of a job and journals them without waiting for
    /// stable storage (see [`Journal::append_unsynced`]): for what a
    /// restart can do without, such as the stage a job is in.
    pub fn update_lazily(&self, id: JobId, f: impl FnOnce(&mut Job)) -> io::Result<()> {
        match self.change(id, f) {
            Some(job) => self.persist_as(Record::Job(Box::new(job)), false),
            None => Ok(()),
        }
    }

    /// Records progress within `stage`: `done` of `total` bytes. The job's
    /// percent is mapped into the stage's span and never goes backwards.
    pub fn progress(&self, id: JobId, stage: Stage, done: u64, total: Option<u64>) {
        self.update(id, |job| {
            let (lo, hi) = stage.span();
            let within = match total {
                Some(t) if t > 0 => (done.min(t) as f64 / t as f64 * f64::from(hi - lo)) as u8,
                _ => 0,
            };
            job.progress.stage = stage;
            // 100 is kept for `completed`, which `finish` sets.
            job.progress.percent = job.progress.percent.max(lo + within).min(99);
            job.progress.bytes_processed = done;
            job.progress.bytes_total = total;
        });
    }

    /// Puts a job in its final state, journaled.
    pub fn finish(&self, id: JobId, status: Status, error: Option<String>) {
        let record = self.change(id, |job| {
            job.status = status;
            job.error = error;
            job.finished_at = Some(SystemTime::now());
            if status == Status::Completed {
                job.progress.stage = Stage::Finalizing;
                job.progress.percent = 100;
            }
        });
        if record.is_some() {
            self.inner.lock().unwrap().finished.push_back(id);
        }
        self.persist_or_log(record);
        self.prune();
    }

    /// Marks a job interrupted by a restart as failed with `error`.
    pub fn recover(&self, id: JobId, error: String) {
        self.finish(id, Status::Failed, Some(error));
    }

    /// Drops finished jobs past the retention limits; returns how many.
    fn prune(&self) -> usize {
        let now = SystemTime::now();
        let mut dropped = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap();
            while let Some(&oldest) = inner.finished.front() {
                let too_many = inner.finished.len() > self.retention.max_finished;
                let too_old = inner.jobs.get(&oldest).is_none_or(|j| {
                    let at = j.finished_at.unwrap_or(j.created_at);
                    now.duration_since(at).unwrap_or_default() > self.retention.max_age
                });
                if !too_many && !too_old {
                    break;
                }
                inner.finished.pop_front();
                if let Some(job) = inner.jobs.remove(&oldest) {
                    if let Some(idem) = job.idempotency {
                        inner.idempotency.remove(&idem.key);
                    }
                    dropped.push(oldest);
                }
            }
        }
        for id in &dropped {
            if let Err(e) = self.persist(Record::Forget { forget: *id, seq: u64::MAX }) {
                log::error!("could not journal dropping job {id}: {e}");
            }
        }
        dropped.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ImageType;
    use std::path::PathBuf;

    fn request(volume: &str) -> JobRequest {
        JobRequest {
            kind: JobKind::Provision,
            image_url: "http://h/a.img".into(),
            volume_name: volume.into(),
            volume_size_gb: 1,
            image_type: ImageType::Raw,
            correlation_id: None,
            image_sha256: None,
        }
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn table(tag: &str, retention: Retention) -> (JobTable, Dir) {
        let dir = std::env::temp_dir().join(format!("lvp-table-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (t, _) = JobTable::open(&dir, retention).unwrap();
        (t, Dir(dir))
    }

    const KEEP: Retention = Retention { max_finished: 100, max_age: Duration::from_secs(3600) };

    fn new(t: &JobTable, volume: &str) -> JobId {
        match t.insert(request(volume), None).unwrap() {
            Submitted::New(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_cancel_rules() {
        let (t, _d) = table("cancel", KEEP);
        let a = new(&t, "a");
        assert_eq!(t.cancel(a), Ok(Cancelled::WhilePending));
        assert_eq!(t.view(a).unwrap().status, Status::Cancelled);
        assert!(t.start(a).is_none(), "a cancelled job never starts");
        assert_eq!(t.cancel(a).unwrap_err().status, 409);
        assert_eq!(t.cancel(uuid::Uuid::new_v4()).unwrap_err().status, 404);

        let b = new(&t, "b");
        let (_, flag) = t.start(b).unwrap();
        assert_eq!(t.cancel(b), Ok(Cancelled::Requested));
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(t.view(b).unwrap().status, Status::Running, "running until rolled back");
    }

    #[test]
    fn test_one_active_job_per_volume() {
        let (t, _d) = table("busy", KEEP);
        let a = new(&t, "v");
        assert_eq!(t.insert(request("v"), None).unwrap_err().status, 409);
        t.start(a).unwrap();
        t.finish(a, Status::Failed, Some("x".into()));
        assert!(t.insert(request("v"), None).is_ok(), "a finished job frees the volume");
    }

    #[test]
    fn test_percent_never_goes_backwards() {
        let (t, _d) = table("percent", KEEP);
        let a = new(&t, "a");
        t.progress(a, Stage::Downloading, 50, Some(100));
        assert_eq!(t.view(a).unwrap().progress.percent, 20);
        t.progress(a, Stage::Downloading, 10, Some(100));
        assert_eq!(t.view(a).unwrap().progress.percent, 20);
        assert_eq!(t.view(a).unwrap().progress.bytes_processed, 10);
        t.progress(a, Stage::Converting, 0, Some(100));
        assert_eq!(t.view(a).unwrap().progress.percent, 50);
        t.progress(a, Stage::Converting, 100, Some(100));
        assert_eq!(t.view(a).unwrap().progress.percent, 98);
        t.progress(a, Stage::Finalizing, 100, Some(100));
        assert_eq!(t.view(a).unwrap().progress.percent, 99, "100 only once completed");
        t.start(a).unwrap();
        t.finish(a, Status::Completed, None);
        assert_eq!(t.view(a).unwrap().progress.percent, 100);
    }

    #[test]
    fn test_idempotency_key() {
        let (t, _d) = table("idem", KEEP);
        let idem = |body: &str| Some(Idempotency { key: "k1".into(), body_sha256: body.into() });
        let Submitted::New(a) = t.insert(request("a"), idem("x")).unwrap() else { panic!() };
        assert_eq!(t.insert(request("a"), idem("x")).unwrap(), Submitted::Existing(a));
        assert_eq!(t.insert(request("b"), idem("y")).unwrap_err().status, 409);
    }

    #[test]
    fn test_jobs_survive_reopen_and_interrupted_ones_are_returned() {
        let dir = std::env::temp_dir().join(format!("lvp-table-reopen-{}", std::process::id()));
        let _d = Dir(dir.clone());
        let _ = std::fs::remove_dir_all(&dir);
        let (done, running, pending);
        {
            let (t, _) = JobTable::open(&dir, KEEP).unwrap();
            done = new(&t, "a");
            t.start(done).unwrap();
            t.finish(done, Status::Completed, None);
            running = new(&t, "b");
            t.start(running).unwrap();
            pending = new(&t, "c");
        }
        let (t, interrupted) = JobTable::open(&dir, KEEP).unwrap();
        assert_eq!(t.view(done).unwrap().status, Status::Completed);
        let mut ids: Vec<JobId> = interrupted.iter().map(|j| j.id).collect();
        ids.sort();
        let mut want = vec![running, pending];
        want.sort();
        assert_eq!(ids, want);
        t.recover(running, "daemon restarted".into());
        assert_eq!(t.view(running).unwrap().status, Status::Failed);
    }

    #[test]
    fn test_retention_by_count() {
        let (t, _d) = table("retention", Retention { max_finished: 2, ..KEEP });
        let ids: Vec<JobId> = (0..4)
            .map(|i| {
                let id = new(&t, &format!("v{i}"));
                t.start(id).unwrap();
                t.finish(id, Status::Completed, None);
                id
            })
            .collect();
        assert!(t.view(ids[0]).is_none() && t.view(ids[1]).is_none());
        assert!(t.view(ids[2]).is_some() && t.view(ids[3]).is_some());
    }
}
