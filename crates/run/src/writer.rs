//! Checkpoints written in the background: the trainer copies its state to host memory (a
//! [`Snapshot`], the only part that stops a step) and a thread writes it with the same
//! guarantees as a synchronous save — temporary folder, fsync, checksums, rename. A crash
//! during the write leaves the previous checkpoint the newest; a later start removes the
//! temporary folder. One write is in flight at a time: the next save waits for it.

use crate::checkpoint::{self, Snapshot};
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

pub struct CheckpointWriter {
    run: PathBuf,
    keep: usize,
    /// Write each checkpoint before returning (the reference path, and for measuring).
    synchronous: bool,
    in_flight: Option<JoinHandle<Result<PathBuf>>>,
}

impl CheckpointWriter {
    pub fn new(run: &Path, keep: usize, synchronous: bool) -> Self {
        Self {
            run: run.to_path_buf(),
            keep,
            synchronous,
            in_flight: None,
        }
    }

    /// Writes `snapshot`, in the background unless synchronous, after the write in flight.
    pub fn submit(&mut self, snapshot: Snapshot) -> Result<()> {
        self.wait()?;
        if self.synchronous {
            checkpoint::write(&self.run, snapshot, self.keep)?;
            return Ok(());
        }
        let (run, keep) = (self.run.clone(), self.keep);
        let name = format!("checkpoint-step-{}", snapshot.state.step);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || checkpoint::write(&run, snapshot, keep))?;
        self.in_flight = Some(handle);
        Ok(())
    }

    /// Waits for the write in flight, if any; its error (a full disk, say) is returned here.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.in_flight.take() {
            None => Ok(None),
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow!("the checkpoint writer thread panicked"))?
                .map(Some),
        }
    }

    /// The error of a write that has finished since, without waiting for one that has not.
    pub fn poll(&mut self) -> Result<()> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait()?;
        }
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    /// A run that stops on an error still finishes the good checkpoint it was writing.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("error: {e:#}");
        }
    }
}
