//! The job table: every job the daemon knows, behind one mutex.
//!
//! Handlers and workers only ever hold the lock for a copy or a field
//! update, never across I/O. Finished jobs are kept up to a bound, oldest
//! dropped first, so memory does not grow with the daemon's age.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{Job, JobId, JobView, Stage, Status};
use crate::api::JobRequest;
use crate::error::ApiError;

/// Finished jobs kept for `status` queries.
// TODO: make this a flag and persist jobs across restarts (issue "Survive
// restarts"); until then a restart forgets every job.
const MAX_FINISHED_JOBS: usize = 10_000;

#[derive(Default)]
pub struct JobTable {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Job>,
    finished: VecDeque<JobId>,
}

/// What `cancel` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The job had not started; it is now `cancelled`.
    WhilePending,
    /// The job is running; the worker stops it and rolls it back.
    Requested,
}

impl JobTable {
    /// Adds a pending job. Refuses a second active job for the same volume.
    pub fn insert(&self, request: JobRequest) -> Result<JobId, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(other) = inner
            .jobs
            .values()
            .find(|j| !j.status.is_final() && j.request.volume_name == request.volume_name)
        {
            return Err(ApiError::volume_busy(format!(
                "volume {} already has an active job {}; wait for it or cancel it",
                request.volume_name, other.id
            )));
        }
        let id = uuid::Uuid::new_v4();
        inner.jobs.insert(id, Job::new(id, request));
        Ok(id)
    }

    /// Forgets a job that never got into the queue.
    pub fn discard(&self, id: JobId) {
        self.inner.lock().unwrap().jobs.remove(&id);
    }

    pub fn view(&self, id: JobId) -> Option<JobView> {
        self.inner.lock().unwrap().jobs.get(&id).map(Job::view)
    }

    pub fn correlation_id(&self, id: JobId) -> Option<String> {
        self.inner.lock().unwrap().jobs.get(&id).map(Job::correlation_id)
    }

    pub fn cancel(&self, id: JobId) -> Result<Cancelled, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let job =
            inner.jobs.get_mut(&id).ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
        match job.status {
            Status::Pending => {
                job.cancel.store(true, Ordering::SeqCst);
                job.status = Status::Cancelled;
                job.error = Some("cancelled before it started".into());
                job.finished_at = Some(SystemTime::now());
                inner.finished.push_back(id);
                Ok(Cancelled::WhilePending)
            }
            Status::Running => {
                job.cancel.store(true, Ordering::SeqCst);
                Ok(Cancelled::Requested)
            }
            done => Err(ApiError::job_finished(format!(
                "job {id} is already {}; nothing to cancel",
                done.as_str()
            ))),
        }
    }

    /// Moves a pending job to running and hands the worker what it needs.
    /// `None` when the job was cancelled (or forgotten) while it waited.
    pub fn start(&self, id: JobId) -> Option<(JobRequest, Arc<AtomicBool>)> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(&id)?;
        if job.status != Status::Pending {
            return None;
        }
        job.status = Status::Running;
        job.started_at = Some(SystemTime::now());
        Some((job.request.clone(), Arc::clone(&job.cancel)))
    }

    /// Changes fields of a job under the lock.
    pub fn update(&self, id: JobId, f: impl FnOnce(&mut Job)) {
        if let Some(job) = self.inner.lock().unwrap().jobs.get_mut(&id) {
            f(job);
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

    /// Puts a running job in its final state.
    pub fn finish(&self, id: JobId, status: Status, error: Option<String>) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(job) = inner.jobs.get_mut(&id) {
            job.status = status;
            job.error = error;
            job.finished_at = Some(SystemTime::now());
            if status == Status::Completed {
                job.progress.stage = Stage::Finalizing;
                job.progress.percent = 100;
            }
            inner.finished.push_back(id);
        }
        while inner.finished.len() > MAX_FINISHED_JOBS {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ImageType;

    fn request(volume: &str) -> JobRequest {
        JobRequest {
            image_url: "http://h/a.img".into(),
            volume_name: volume.into(),
            volume_size_gb: 1,
            image_type: ImageType::Raw,
            correlation_id: None,
            image_sha256: None,
        }
    }

    #[test]
    fn test_cancel_rules() {
        let t = JobTable::default();
        let a = t.insert(request("a")).unwrap();
        assert_eq!(t.cancel(a), Ok(Cancelled::WhilePending));
        assert_eq!(t.view(a).unwrap().status, Status::Cancelled);
        assert!(t.start(a).is_none(), "a cancelled job never starts");
        assert_eq!(t.cancel(a).unwrap_err().status, 409);
        assert_eq!(t.cancel(uuid::Uuid::new_v4()).unwrap_err().status, 404);

        let b = t.insert(request("b")).unwrap();
        let (_, flag) = t.start(b).unwrap();
        assert_eq!(t.cancel(b), Ok(Cancelled::Requested));
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(t.view(b).unwrap().status, Status::Running, "running until rolled back");
    }

    #[test]
    fn test_one_active_job_per_volume() {
        let t = JobTable::default();
        let a = t.insert(request("v")).unwrap();
        assert_eq!(t.insert(request("v")).unwrap_err().status, 409);
        t.start(a).unwrap();
        t.finish(a, Status::Failed, Some("x".into()));
        assert!(t.insert(request("v")).is_ok(), "a finished job frees the volume");
    }

    #[test]
    fn test_percent_never_goes_backwards() {
        let t = JobTable::default();
        let a = t.insert(request("a")).unwrap();
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
}
