//! Jobs: what one provision request becomes, and its life.
//!
//! ```text
//!   submit ──▶ pending ──worker picks it──▶ running ──▶ completed
//!                 │                            │  └────▶ failed
//!                 └──cancel──▶ cancelled ◀──cancel (after rollback)
//! ```
//!
//! A job's fields change only under the table's lock ([`table`]); readers
//! get a [`JobView`] copy. `percent` never goes backwards over a job's life;
//! `bytes_processed`/`bytes_total` describe the current stage.

pub mod journal;
pub mod pipeline;
pub mod queue;
pub mod table;

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::{ImageType, JobRequest, ProgressView};

pub type JobId = Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    pub fn parse(text: &str) -> Option<Status> {
        [Status::Pending, Status::Running, Status::Completed, Status::Failed, Status::Cancelled]
            .into_iter()
            .find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The stages of a job, in order. Each owns a span of the job's percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Queued,
    Downloading,
    Inspecting,
    CreatingVolume,
    Converting,
    Copying,
    Finalizing,
}

impl Stage {
    /// The part of the job's 0–100 percent this stage covers. Downloading
    /// and writing dominate; on a cache hit the download's share is skipped.
    pub fn span(self) -> (u8, u8) {
        match self {
            Stage::Queued => (0, 0),
            Stage::Downloading => (0, 40),
            Stage::Inspecting => (40, 45),
            Stage::CreatingVolume => (45, 50),
            Stage::Converting | Stage::Copying => (50, 98),
            Stage::Finalizing => (98, 100),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Downloading => "downloading",
            Stage::Inspecting => "inspecting",
            Stage::CreatingVolume => "creating_volume",
            Stage::Converting => "converting",
            Stage::Copying => "copying",
            Stage::Finalizing => "finalizing",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job did to its volume, journaled before and after the act so
/// that recovery after a crash knows what to undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeMark {
    /// The job has not touched a volume.
    #[default]
    Untouched,
    /// The job found no volume and is about to create one.
    Intent,
    /// The job created the volume: failure or restart removes it.
    Created,
    /// The job reuses a volume that existed before: it is never removed.
    Reused,
}

/// The `Idempotency-Key` a job was submitted with, and the SHA-256 of the
/// body that came with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: String,
    pub body_sha256: String,
}

/// One job, as the table holds it and the journal records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Bumped on every journaled change; replay keeps the highest.
    pub seq: u64,
    pub request: JobRequest,
    pub status: Status,
    pub progress: ProgressView,
    pub cache_hit: bool,
    pub image_path: Option<String>,
    pub image_sha256: Option<String>,
    pub volume_path: Option<String>,
    #[serde(default)]
    pub volume_mark: VolumeMark,
    pub error: Option<String>,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    #[serde(default)]
    pub idempotency: Option<Idempotency>,
    /// Set to stop the job; not persisted (a restarted daemon has no
    /// running jobs to stop).
    #[serde(skip)]
    pub cancel: Arc<AtomicBool>,
    /// Why a running job was told to stop, when it was not a caller's
    /// cancel (a shutdown whose grace period ran out).
    #[serde(skip)]
    pub cancel_reason: Option<String>,
}

/// A job as `GET /api/v1/status/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    pub job_id: JobId,
    pub status: Status,
    pub progress: ProgressView,
    pub correlation_id: String,
    pub cache_hit: bool,
    pub image_path: Option<String>,
    pub image_url: String,
    pub image_type: ImageType,
    pub image_sha256: Option<String>,
    pub kind: crate::api::JobKind,
    /// `null` for a prefetch job.
    pub volume_name: Option<String>,
    pub volume_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl Job {
    pub fn new(id: JobId, request: JobRequest) -> Job {
        Job {
            id,
            seq: 0,
            request,
            status: Status::Pending,
            progress: ProgressView {
                stage: Stage::Queued,
                percent: 0,
                bytes_processed: 0,
                bytes_total: None,
            },
            cache_hit: false,
            image_path: None,
            image_sha256: None,
            volume_path: None,
            volume_mark: VolumeMark::Untouched,
            error: None,
            created_at: SystemTime::now(),
            started_at: None,
            finished_at: None,
            idempotency: None,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_reason: None,
        }
    }

    /// The label logs and responses use: the caller's, else the job id.
    pub fn correlation_id(&self) -> String {
        self.request.correlation_id.clone().unwrap_or_else(|| self.id.to_string())
    }

    pub fn view(&self) -> JobView {
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        JobView {
            job_id: self.id,
            status: self.status,
            progress: self.progress.clone(),
            correlation_id: self.correlation_id(),
            cache_hit: self.cache_hit,
            image_path: self.image_path.clone(),
            image_url: crate::fetch::redact(&self.request.image_url),
            image_type: self.request.image_type,
            image_sha256: self.image_sha256.clone(),
            kind: self.request.kind,
            volume_name: Some(self.request.volume_name.clone()).filter(|n| !n.is_empty()),
            volume_path: self.volume_path.clone(),
            error: self.error.clone(),
            created_at: time(self.created_at),
            started_at: self.started_at.map(time),
            finished_at: self.finished_at.map(time),
        }
    }
}

/// The prefix of every log line about a job, so one grep finds them all.
pub struct JobCtx<'a> {
    pub id: JobId,
    pub correlation: &'a str,
    pub volume: &'a str,
}

impl fmt::Display for JobCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id.simple().to_string();
        write!(f, "job={} corr={} vol={}", &id[..8], clean_label(self.correlation), self.volume)
    }
}

/// A caller-supplied label made safe for one log line.
pub fn clean_label(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}
