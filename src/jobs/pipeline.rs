//! The stages of one job, in order:
//!
//! 1. `downloading`: find the expected digest (`image_sha256`, else the
//!    `.sha256` sidecar); use the cache entry if there is one, else
//!    download (or wait for the job already downloading the same URL),
//!    verify and store it. A raw image for a provision is written into the
//!    volume in the same pass when this job creates the volume, which it
//!    then does here, before the download (see [`crate::write::VolumeTee`]
//!    for why that is safe); the later stages find it written.
//! 2. `inspecting`: for qcow2 our own header reader and `qemu-img check`,
//!    then `qemu-img info -f <image_type>` (see [`crate::inspect`]); refuse
//!    backing files, external data files, encryption, corrupt or truncated
//!    images, and images larger than the volume. An image refused for what
//!    it is (not for its size) loses its cache entry.
//! 3. `creating_volume`: create the volume, or reuse one that is not open.
//! 4. `converting` (qcow2) or `copying` (raw): write the image.
//! 5. `finalizing`: the volume is flushed to stable storage, then the job
//!    is `completed`.
//!
//! Cancel is checked between stages and inside downloads and writes. On
//! failure or cancel a volume this job created is removed, a reused one is
//! left (and the error says so), and a partial download is deleted.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::table::JobTable;
use super::{JobCtx, JobId, Stage, Status, VolumeMark};
use crate::api::{ImageType, JobKind, JobRequest};
use crate::cache::{Cache, Role};
use crate::error::chain;
use crate::fetch::{redact, FetchError, Fetcher, SparseFile};
use crate::inspect;
use crate::qcow2::Header;
use crate::volume::{Volume, VolumeBackend};
use crate::write::{self, IoMode};

/// How often a job retries after the download it waited for failed.
const FLIGHT_ATTEMPTS: usize = 3;

/// A memoised inspection: what qemu-img found, and the qcow2 header (by
/// our own reader) it found it in.
type Inspected = (inspect::ImageInfo, Option<Header>);

pub struct Pipeline {
    pub table: Arc<JobTable>,
    pub cache: Cache,
    pub backend: Box<dyn VolumeBackend>,
    pub fetcher: Fetcher,
    pub require_digest: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub libvirt: crate::libvirt::PoolRefresher,
    /// Re-hash cache entries before use (`--verify-cache`).
    pub verify_cache: bool,
    /// Evict least recently used entries past this size (`--cache-max-gb`).
    pub cache_max_bytes: Option<u64>,
    /// Leave a volume's bytes after the image as they are (`--keep-tail`).
    pub keep_tail: bool,
    /// Write volumes through the page cache or with O_DIRECT (`--direct-io`).
    pub io: IoMode,
    /// What inspection found, by image digest and format (see
    /// [`Pipeline::inspect_image`]).
    pub inspected: Mutex<HashMap<(String, ImageType), Inspected>>,
}

/// Times the stage a job is in, for the stage-duration histogram and the
/// log line each stage ends with.
struct StageTimer<'a> {
    id: JobId,
    ctx: &'a JobCtx<'a>,
    current: Option<(Stage, Instant)>,
}

impl StageTimer<'_> {
    /// Ends the current stage, if any.
    fn close(&mut self, pipeline: &Pipeline) {
        if let Some((stage, since)) = self.current.take() {
            let secs = since.elapsed().as_secs_f64();
            pipeline.metrics.stage_done(stage, secs);
            let bytes = pipeline
                .table
                .view(self.id)
                .map(|v| v.progress.bytes_processed)
                .unwrap_or_default();
            log::info!("{} stage={stage}: done in {secs:.2}s, {bytes} bytes", self.ctx);
        }
    }
}

/// Why a job stopped.
struct Stop {
    stage: Stage,
    message: String,
    cancelled: bool,
}

impl Stop {
    fn fail(stage: Stage, message: impl Into<String>) -> Stop {
        Stop { stage, message: message.into(), cancelled: false }
    }

    fn cancelled(stage: Stage) -> Stop {
        Stop { stage, message: "cancelled by request".into(), cancelled: true }
    }
}

/// What stage 1 leaves for the next ones.
struct Obtained {
    /// The verified cache entry.
    image: PathBuf,
    /// Its length in bytes.
    len: u64,
    /// The volume, when stage 1 already prepared it (a raw image).
    volume: Option<Volume>,
    /// Whether the image was written into `volume` while it downloaded.
    streamed: bool,
    /// The flush of the cache entry this job stored, held until the volume
    /// is flushed (it starts when dropped, on every path).
    flush: Option<crate::cache::Flush>,
}

impl From<(PathBuf, u64)> for Obtained {
    fn from((image, len): (PathBuf, u64)) -> Obtained {
        Obtained { image, len, volume: None, streamed: false, flush: None }
    }
}

/// What a job has done that a failure must undo.
#[derive(Default)]
struct Undo {
    temp_file: Option<PathBuf>,
    volume: Option<Volume>,
    /// Whether the write stage began, so that a reused volume may have
    /// been changed.
    writing: bool,
}

impl Pipeline {
    /// Runs job `id` to its end. Does nothing if it was cancelled while it
    /// waited in the queue.
    pub fn run(&self, id: JobId) {
        let Some((req, cancel)) = self.table.start(id) else {
            return;
        };
        let correlation = req.correlation_id.clone().unwrap_or_else(|| id.to_string());
        let volume = match req.kind {
            JobKind::Provision => self.backend.describe(&req.volume_name),
            JobKind::Prefetch => "-".to_string(),
        };
        let ctx = JobCtx { id, correlation: &correlation, volume: &volume };
        let started = Instant::now();
        log::info!("{ctx} stage=queued: started, image {}", redact(&req.image_url));
        let mut undo = Undo::default();
        let outcome = self.stages(id, &ctx, &req, &cancel, &mut undo);
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                log::info!("{ctx} stage=finalizing: completed in {secs:.1}s");
                self.table.finish(id, Status::Completed, None);
                self.metrics.job_finished(Status::Completed);
            }
            Err(stop) => {
                let rollback = self.roll_back(&ctx, undo);
                let status = if stop.cancelled { Status::Cancelled } else { Status::Failed };
                let message = match self.table.cancel_reason(id) {
                    Some(why) if stop.cancelled => why,
                    _ => stop.message,
                };
                let error = format!("{}: {message}{rollback}", stop.stage);
                if stop.cancelled {
                    log::info!("{ctx} stage={}: cancelled after {secs:.1}s{rollback}", stop.stage);
                } else {
                    // A bad source or a refused image is the caller's to fix,
                    // and anyone holding a token can cause one: warn. Past
                    // inspection, a failure is the host's (disk, LVM,
                    // qemu-img): error, for the operator.
                    let level = match stop.stage {
                        Stage::Queued | Stage::Downloading | Stage::Inspecting => log::Level::Warn,
                        _ => log::Level::Error,
                    };
                    log::log!(
                        level,
                        "{ctx} stage={}: job failed after {secs:.1}s: {error}",
                        stop.stage
                    );
                }
                self.table.finish(id, status, Some(error));
                self.metrics.job_finished(status);
            }
        }
    }

    fn stages(
        &self,
        id: JobId,
        ctx: &JobCtx,
        req: &JobRequest,
        cancel: &AtomicBool,
        undo: &mut Undo,
    ) -> Result<(), Stop> {
        let mut timer = StageTimer { id, ctx, current: None };
        let outcome = self.run_stages(&mut timer, req, cancel, undo);
        timer.close(self);
        outcome
    }

    fn run_stages(
        &self,
        timer: &mut StageTimer,
        req: &JobRequest,
        cancel: &AtomicBool,
        undo: &mut Undo,
    ) -> Result<(), Stop> {
        let (id, ctx) = (timer.id, timer.ctx);
        let check = |stage| {
            if cancel.load(Ordering::SeqCst) {
                Err(Stop::cancelled(stage))
            } else {
                Ok(())
            }
        };
        self.enter(timer, Stage::Downloading);
        let obtained = self.obtain_image(id, ctx, req, cancel, undo)?;
        let (image, image_len) = (obtained.image, obtained.len);
        if req.kind == JobKind::Prefetch {
            // The image is verified and cached: that is all a prefetch does.
            // Known limitation: it is not inspected, so a hostile image can
            // sit in the cache until a provision refuses (and deletes) it.
            self.table.progress(id, Stage::Finalizing, image_len, Some(image_len));
            return Ok(());
        }
        check(Stage::Inspecting)?;

        self.enter(timer, Stage::Inspecting);
        let info = self.inspect_image(ctx, &image, req.image_type)?;
        inspect::check(&info, req.volume_bytes())
            .map_err(|e| Stop::fail(Stage::Inspecting, chain(&e)))?;
        check(Stage::CreatingVolume)?;

        self.enter(timer, Stage::CreatingVolume);
        let volume = match obtained.volume {
            Some(volume) => volume,
            None => self.prepare_volume(id, ctx, req, undo)?,
        };
        if info.virtual_size > volume.size {
            return Err(Stop::fail(
                Stage::CreatingVolume,
                format!(
                    "image's virtual size {} bytes is larger than the existing volume's {} bytes",
                    info.virtual_size, volume.size
                ),
            ));
        }
        let write_stage = match req.image_type {
            ImageType::Qcow2 => Stage::Converting,
            ImageType::Raw => Stage::Copying,
        };
        check(write_stage)?;

        self.enter(timer, write_stage);
        undo.writing = true;
        if !volume.created {
            // A restart tells an untouched reused volume from a written one
            // by this stage, so it must not be lost to a power cut.
            if let Err(e) = self.table.update_durably(id, |_| {}) {
                log::error!("{ctx}: could not journal the start of the write: {e}");
            }
        }
        let total = info.virtual_size;
        let written = match req.image_type {
            _ if obtained.streamed => {
                log::info!("{ctx} stage={write_stage}: written while downloading; nothing to copy");
                self.table.progress(id, write_stage, image_len, Some(image_len));
                Ok(())
            }
            ImageType::Raw if self.io == IoMode::Buffered => {
                write::copy_raw(&image, image_len, &volume, cancel, &mut |done| {
                    self.table.progress(id, write_stage, done, Some(image_len));
                })
            }
            format => write::convert(&image, format, &volume, self.io, cancel, &mut |pct| {
                let done = (pct / 100.0 * total as f64) as u64;
                self.table.progress(id, write_stage, done, Some(total));
            }),
        };
        written.map_err(|e| {
            if e.is_cancel() {
                Stop::cancelled(write_stage)
            } else {
                Stop::fail(write_stage, format!("write {}: {}", ctx.volume, chain(&e)))
            }
        })?;
        let written = match req.image_type {
            ImageType::Qcow2 => total,
            ImageType::Raw => image_len,
        };
        self.metrics.bytes_written.inc_by(written);
        self.enter(timer, Stage::Finalizing);
        write::finish_volume(&volume, written, self.keep_tail, cancel).map_err(|e| {
            if e.is_cancel() {
                Stop::cancelled(Stage::Finalizing)
            } else {
                Stop::fail(Stage::Finalizing, format!("finish {}: {}", ctx.volume, chain(&e)))
            }
        })?;
        log::info!("{ctx} stage=finalizing: volume flushed to stable storage");
        // The volume is on disk: now the cache entry may have the disk.
        if let Some(flush) = obtained.flush {
            flush.start();
        }
        self.table.progress(id, Stage::Finalizing, written, Some(written));
        Ok(())
    }

    /// Stage 2, through the memo: qemu-img inspects an image once per
    /// digest and format in this daemon's life, so a warm job starts
    /// writing at once instead of running qemu-img twice first. A cache
    /// entry is named by its digest, but only its size is checked at each
    /// use (its digest only with `--verify-cache`): so a memo hit still
    /// reads the qcow2 header again with our own reader, which refuses a
    /// backing file, a data file or encryption, and the header must be the
    /// one qemu-img passed, or the image is inspected in full again.
    fn inspect_image(
        &self,
        ctx: &JobCtx,
        image: &std::path::Path,
        format: ImageType,
    ) -> Result<inspect::ImageInfo, Stop> {
        let refuse = |e: inspect::InspectError| {
            let mut message = chain(&e);
            if e.condemns_image() {
                message.push_str(&self.discard_refused(ctx, image));
            }
            Stop::fail(Stage::Inspecting, message)
        };
        let digest = image.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let key = (digest, format);
        let header = inspect::read_header(image, format).map_err(|e| {
            self.inspected.lock().unwrap().remove(&key);
            refuse(e)
        })?;
        if let Some((info, seen)) = self.inspected.lock().unwrap().get(&key) {
            if *seen == header {
                log::info!("{ctx} stage=inspecting: inspected before, {info:?}");
                return Ok(info.clone());
            }
            log::warn!(
                "{ctx} stage=inspecting: cache entry {} changed since it was inspected; \
                 inspecting it again",
                image.display()
            );
        }
        let info = inspect::inspect(image, format).map_err(refuse)?;
        self.inspected.lock().unwrap().insert(key, (info.clone(), header));
        Ok(info)
    }

    /// Creates the job's volume, or takes an existing one to reuse. The
    /// intent is journaled before the volume exists, so that a restart
    /// after a crash in between knows the volume may be ours.
    fn prepare_volume(
        &self,
        id: JobId,
        ctx: &JobCtx,
        req: &JobRequest,
        undo: &mut Undo,
    ) -> Result<Volume, Stop> {
        let stage = Stage::CreatingVolume;
        let mut record_intent = || {
            self.table
                .update_durably(id, |j| j.volume_mark = VolumeMark::Intent)
                .map_err(|e| format!("cannot journal the intent to create it ({e})"))
        };
        let volume = self
            .backend
            .prepare(&req.volume_name, req.volume_bytes(), &id.to_string(), &mut record_intent)
            .map_err(|e| Stop::fail(stage, chain(&e)))?;
        undo.volume = Some(volume.clone());
        if volume.created {
            self.libvirt.refresh(&format!("creating {}", ctx.volume));
        }
        let path = volume.path.display().to_string();
        let mark = if volume.created { VolumeMark::Created } else { VolumeMark::Reused };
        // Not waited for: the durable intent already makes a restart
        // remove a volume this job created, and a reused volume is left
        // alone whether or not this record survives.
        let recorded = self.table.update_lazily(id, |j| {
            j.volume_path = Some(path);
            j.volume_mark = mark;
        });
        if let Err(e) = recorded {
            log::error!("{ctx}: could not journal the volume's state: {e}");
        }
        Ok(volume)
    }

    /// Moves the job to `stage`, journaled, so that a restart can say
    /// where the job was interrupted; logs and times the stage it leaves.
    /// The record is not waited for: what undo needs (the volume mark) and
    /// the final state are journaled durably on their own, and a stage
    /// lost to a power cut only makes the restart's message less precise.
    /// This saves five fdatasyncs a job.
    fn enter(&self, timer: &mut StageTimer, stage: Stage) {
        timer.close(self);
        let (id, ctx) = (timer.id, timer.ctx);
        log::info!("{ctx} stage={stage}: entered");
        self.table.progress(id, stage, 0, None);
        if let Err(e) = self.table.update_lazily(id, |_| {}) {
            log::error!("{ctx}: could not journal the stage change: {e}");
        }
        timer.current = Some((stage, Instant::now()));
    }

    /// Stage 1: the verified cache entry for the request's image, and its
    /// length in bytes.
    fn obtain_image(
        &self,
        id: JobId,
        ctx: &JobCtx,
        req: &JobRequest,
        cancel: &AtomicBool,
        undo: &mut Undo,
    ) -> Result<Obtained, Stop> {
        let stage = Stage::Downloading;
        let (expected, source) = match &req.image_sha256 {
            Some(d) => (Some(d.clone()), "image_sha256"),
            None => {
                let found = self
                    .fetcher
                    .sidecar_digest(&req.image_url)
                    .map_err(|e| Stop::fail(stage, chain(&e)))?;
                (found, "the .sha256 file")
            }
        };
        if expected.is_none() && self.require_digest {
            return Err(Stop::fail(
                stage,
                format!(
                    "no digest for {}: give image_sha256 or publish {} (--require-digest is set)",
                    redact(&req.image_url),
                    redact(&crate::fetch::sidecar_url(&req.image_url))
                ),
            ));
        }
        if let Some(digest) = &expected {
            if let Some(entry) = self.cache.lookup(digest, self.verify_cache) {
                log::info!("{ctx} stage=downloading: cache hit {digest}");
                self.metrics.cache_hits.inc();
                return Ok(self.use_entry(id, entry, digest, true).into());
            }
            log::info!("{ctx} stage=downloading: cache miss {digest} (expected from {source})");
            self.metrics.cache_misses.inc();
        } else {
            // Known limitation: without a digest before the download there
            // is no key to look the cache up by, so such an image is
            // downloaded by every job that names it.
            log::info!("{ctx} stage=downloading: no digest published; downloading to compute it");
            self.metrics.cache_misses.inc();
        }

        for _ in 0..FLIGHT_ATTEMPTS {
            match self.cache.join_flight(&req.image_url) {
                Role::Leader(guard) => {
                    // A leader that finished between our cache lookup and
                    // join_flight has left its entry: use it rather than
                    // download the image a second time.
                    if let Some(digest) = &expected {
                        if let Some(entry) = self.cache.lookup(digest, false) {
                            log::info!("{ctx} stage=downloading: cache hit {digest} (just stored)");
                            // Jobs that joined this flight meanwhile take
                            // the same entry instead of trying again.
                            guard.finish(digest.clone());
                            return Ok(self.use_entry(id, entry, digest, true).into());
                        }
                    }
                    let (temp, file) = self
                        .cache
                        .temp_file(&id.to_string())
                        .map_err(|e| Stop::fail(stage, format!("create temporary file: {e}")))?;
                    undo.temp_file = Some(temp.clone());
                    // A raw image can go into the volume as it arrives, but
                    // only into a volume this job creates: on a digest
                    // mismatch the job fails and the volume is removed,
                    // so unverified bytes never outlive the job. Not with
                    // O_DIRECT, which qemu-img writes after the download.
                    let volume = match (req.kind, req.image_type) {
                        (JobKind::Provision, ImageType::Raw) if self.io == IoMode::Buffered => {
                            Some(self.prepare_volume(id, ctx, req, undo)?)
                        }
                        _ => None,
                    };
                    let mut sink = write::VolumeTee::new(
                        SparseFile { file },
                        volume.as_ref().filter(|v| v.created),
                    )
                    .map_err(|e| Stop::fail(stage, format!("open the volume to write: {e}")))?;
                    let streamed = sink.streams();
                    if streamed {
                        log::info!(
                            "{ctx} stage=downloading: writing the raw image into the new volume \
                             while downloading"
                        );
                    }
                    let flight = Arc::clone(&guard.flight);
                    let got = self
                        .fetcher
                        .download(&req.image_url, &mut sink, cancel, &mut |done, total| {
                            flight.bytes_done.store(done, Ordering::Relaxed);
                            flight.bytes_total.store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
                            self.table.progress(id, stage, done, total);
                        })
                        .map_err(|e| match e {
                            FetchError::Cancelled => Stop::cancelled(stage),
                            e => Stop::fail(stage, chain(&e)),
                        })?;
                    let file = sink.into_cache_file();
                    self.metrics.bytes_downloaded.inc_by(got.bytes);
                    if let Some(want) = &expected {
                        if *want != got.sha256 {
                            return Err(Stop::fail(
                                stage,
                                format!(
                                    "digest mismatch for {}: expected {want} (from {source}), \
                                     downloaded {} bytes with digest {}; nothing was cached",
                                    redact(&req.image_url),
                                    got.bytes,
                                    got.sha256
                                ),
                            ));
                        }
                    }
                    let (entry, flush) = self
                        .cache
                        .commit(&temp, file, &got.sha256, &req.image_url)
                        .map_err(|e| Stop::fail(stage, format!("store image in the cache: {e}")))?;
                    undo.temp_file = None;
                    log::info!(
                        "{ctx} stage=downloading: stored {} bytes as {}",
                        got.bytes,
                        entry.display()
                    );
                    guard.finish(got.sha256.clone());
                    let (image, len) = self.use_entry(id, entry, &got.sha256, false);
                    // Known limitation: eviction runs only here, when a new
                    // entry is stored, not when the limit is lowered or time passes.
                    if let Some(max) = self.cache_max_bytes {
                        let (digests, urls) = self.table.images_in_use();
                        self.cache.evict(max, &digests, &urls);
                    }
                    let flush = Some(flush);
                    return Ok(Obtained { image, len, volume, streamed, flush });
                }
                Role::Follower(flight) => {
                    log::info!(
                        "{ctx} stage=downloading: waiting for the download another job runs"
                    );
                    let outcome = flight
                        .wait(cancel, &mut |done, total| {
                            self.table.progress(id, stage, done, total);
                        })
                        .map_err(|()| Stop::cancelled(stage))?;
                    let Some(digest) = outcome else { continue };
                    if let Some(want) = &expected {
                        if *want != digest {
                            return Err(Stop::fail(
                                stage,
                                format!(
                                    "digest mismatch for {}: expected {want} (from {source}), \
                                     the server sent an image with digest {digest}",
                                    redact(&req.image_url)
                                ),
                            ));
                        }
                    }
                    if let Some(entry) = self.cache.lookup(&digest, self.verify_cache) {
                        return Ok(self.use_entry(id, entry, &digest, false).into());
                    }
                }
            }
        }
        Err(Stop::fail(stage, "the shared download of this image failed repeatedly"))
    }

    /// Deletes the cache entry of an image that inspection refused for
    /// what it is (not for its size), so that no later job, or a restart,
    /// takes it for a good image. Returns a note for the job's error.
    fn discard_refused(&self, ctx: &JobCtx, image: &std::path::Path) -> String {
        let Some(digest) = image.file_stem().and_then(|s| s.to_str()) else {
            return String::new();
        };
        match self.cache.purge(digest) {
            Ok(_) => "; its cache entry was deleted".to_string(),
            Err(e) => {
                log::error!(
                    "{ctx}: could not delete refused cache entry {}: {e}; remove it by hand",
                    image.display()
                );
                format!("; deleting its cache entry failed: {e}")
            }
        }
    }

    fn use_entry(&self, id: JobId, entry: PathBuf, digest: &str, hit: bool) -> (PathBuf, u64) {
        let len = fs::metadata(&entry).map(|m| m.len()).unwrap_or(0);
        let shown = entry.display().to_string();
        let digest = digest.to_string();
        self.table.update(id, |j| {
            j.cache_hit = hit;
            j.image_path = Some(shown);
            j.image_sha256 = Some(digest);
        });
        self.table.progress(id, Stage::Downloading, len, Some(len));
        (entry, len)
    }

    /// Undoes what a stopped job did. Returns a note for the job's error
    /// about what was removed or left.
    fn roll_back(&self, ctx: &JobCtx, undo: Undo) -> String {
        if let Some(temp) = undo.temp_file {
            if let Err(e) = fs::remove_file(&temp) {
                log::error!("{ctx}: could not remove {}: {e}; remove it by hand", temp.display());
            }
        }
        match undo.volume {
            None => String::new(),
            Some(v) if !v.created && !undo.writing => {
                "; the existing volume was left in place, not written".to_string()
            }
            Some(v) if !v.created => {
                "; the existing volume was reused and is left in place (its content may be partly overwritten)"
                    .to_string()
            }
            Some(v) => match self.backend.remove(&v) {
                Ok(()) => {
                    self.libvirt.refresh(&format!("removing {}", ctx.volume));
                    "; the volume this job created was removed".to_string()
                }
                Err(e) => {
                    log::error!(
                        "{ctx}: could not remove volume {} that this job created: {}; remove it by hand",
                        ctx.volume,
                        chain(&e)
                    );
                    format!("; removing the volume it created failed: {}", chain(&e))
                }
            },
        }
    }
}

/// Marks jobs that a previous daemon left pending or running as failed,
/// after undoing what they half did: a volume they created, or were about
/// to create, is removed (an LV only if it carries the job's tag). Their
/// partial downloads were already swept when the cache was opened.
pub fn recover_interrupted(table: &JobTable, backend: &dyn VolumeBackend, jobs: Vec<super::Job>) {
    for job in jobs {
        let stage = job.progress.stage;
        let name = &job.request.volume_name;
        let undone = match job.volume_mark {
            VolumeMark::Untouched => String::new(),
            // The write stage of a reused volume is journaled durably.
            VolumeMark::Reused
                if !matches!(stage, Stage::Converting | Stage::Copying | Stage::Finalizing) =>
            {
                "; the volume existed before the job and was left in place, not written".to_string()
            }
            // Known limitation: a reused volume is not ours to remove, and
            // its old content is gone; it stays partly written.
            VolumeMark::Reused => {
                "; the volume existed before the job and was left in place (it may hold a \
                 partly written image)"
                    .to_string()
            }
            VolumeMark::Intent | VolumeMark::Created => {
                match backend.remove_after_restart(name, &job.id.to_string()) {
                    Ok(true) => "; the volume it created was removed".to_string(),
                    Ok(false) => "; it had created no volume".to_string(),
                    Err(e) => {
                        log::error!(
                            "could not remove volume {} left by interrupted job {}: {}; remove it by hand",
                            backend.describe(name),
                            job.id,
                            chain(&e)
                        );
                        format!("; removing the volume it created failed: {}", chain(&e))
                    }
                }
            }
        };
        let (was, swept) = match (job.status, stage) {
            (Status::Pending, _) => ("waiting to start".to_string(), ""),
            (_, Stage::Downloading) => {
                ("downloading".to_string(), "; its partial download was deleted")
            }
            (_, stage) => (format!("at stage {stage}"), ""),
        };
        let error = format!("{stage}: the daemon restarted while the job was {was}{swept}{undone}");
        log::warn!("job {} interrupted by a restart: {error}", job.id);
        table.recover(job.id, error);
    }
}
