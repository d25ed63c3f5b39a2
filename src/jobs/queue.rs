//! The bounded job queue and the fixed pool of workers that drain it.
//!
//! Handlers never block on the queue: a full queue answers 503 at once.

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::pipeline::Pipeline;
use super::JobId;

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
