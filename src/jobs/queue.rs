//! The bounded job queue and the fixed pool of workers that drain it.
//!
//! Handlers never block on the queue: a full queue answers 503 at once.
//!
//! Workers run at a lower CPU priority ([`WORKER_NICE`]) than the threads
//! that serve the API, and so do the qemu-img processes they start (a child
//! inherits its thread's nice value): on a busy host, hashing and
//! converting take whatever CPU the API leaves, and a status request does
//! not wait behind them. The price: on a host whose other processes keep
//! the CPUs busy, jobs get a smaller share than a nice 0 job would.

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::pipeline::Pipeline;
use super::JobId;

/// The nice value of worker threads (and so of their children): 10 gives
/// a thread about a tenth of the CPU share of a nice 0 thread when both
/// want it, and lets the API threads preempt it on wake-up.
pub const WORKER_NICE: libc::c_int = 10;

/// Lowers the calling thread's CPU priority to [`WORKER_NICE`]. On Linux
/// the nice value belongs to the thread, so this leaves the rest of the
/// daemon as it is. A failure only costs latency and is logged.
fn lower_priority() {
    // SAFETY: gettid and setpriority take and return plain integers.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, WORKER_NICE)
    };
    if rc != 0 {
        log::warn!(
            "cannot lower the worker's CPU priority: {}; status requests may be slower \
             during jobs",
            std::io::Error::last_os_error()
        );
    }
}

pub struct Queue {
    tx: Sender<JobId>,
}

impl Queue {
    /// Starts `workers` threads named `worker-N` that run jobs from a queue
    /// holding at most `capacity` waiting jobs.
    pub fn start(
        workers: usize,
        capacity: usize,
        pipeline: Arc<Pipeline>,
    ) -> (Queue, Vec<JoinHandle<()>>) {
        let (tx, rx) = crossbeam_channel::bounded::<JobId>(capacity);
        let handles = (1..=workers)
            .map(|n| {
                let rx: Receiver<JobId> = rx.clone();
                let pipeline = Arc::clone(&pipeline);
                thread::Builder::new()
                    .name(format!("worker-{n}"))
                    .spawn(move || {
                        lower_priority();
                        for id in rx {
                            pipeline.run(id);
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        (Queue { tx }, handles)
    }

    /// Hands a job to the workers; `false` when the queue is full.
    pub fn try_push(&self, id: JobId) -> bool {
        match self.tx.try_send(id) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}
