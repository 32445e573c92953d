//! [`Collective`] over MPI (the `mpi` crate): fp32 sums and f64 gathers through host memory,
//! so ranks on CUDA, ROCm and CPU devices can share one job.

use anyhow::{anyhow, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::send_receive_into;
use mpi::topology::Color;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use nuwa_train::parallel::Collective;
use std::sync::Arc;

/// The communicator. MPI is initialised for one thread at a time (`Threading::Serialized`):
/// the trainer calls it from its own thread, and from Burn's autodiff backward, which runs on
/// the thread that called `backward` — never from two threads at once.
pub struct MpiCollective {
    world: SimpleCommunicator,
}

/// MPI's environment: finalised by [`finalize`] (when dropped), not when the last
/// communicator goes, since copies of a communicator can outlive the job's end in places
/// (an autodiff graph's saved state) the process does not wait for.
struct Environment {
    _universe: Universe,
}

// SAFETY: only touched by `init` and `finalize`, on the main thread.
unsafe impl Send for Environment {}

static ENVIRONMENT: std::sync::Mutex<Option<Environment>> = std::sync::Mutex::new(None);

/// Finalises MPI (every rank must, before it exits); nothing may use a communicator after.
pub fn finalize() {
    let env = ENVIRONMENT.lock().map(|mut e| e.take());
    drop(env);
}

impl MpiCollective {
    /// Initialises MPI; fails when it was already initialised or nuwa was not started by
    /// `mpirun`-like tooling that MPI understands.
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| anyhow!("MPI could not be initialised"))?;
        let world = universe.world();
        if let Ok(mut env) = ENVIRONMENT.lock() {
            *env = Some(Environment {
                _universe: universe,
            });
        }
        Ok(Self { world })
    }
}

// SAFETY: see the type's comment — calls are serialised by the training loop, and MPI was
// initialised with `Threading::Serialized`, which allows calls from any one thread at a time.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

/// MPI counts and displacements (`i32`) of consecutive blocks of `counts` values.
fn partition(counts: &[usize]) -> (Vec<i32>, Vec<i32>) {
    let counts: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
    let displs = counts
        .iter()
        .scan(0, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect();
    (counts, displs)
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
    }
    fn all_gather(&self, values: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; values.len() * self.size()];
        self.world.all_gather_into(values, &mut out[..]);
        out
    }
    fn barrier(&self) {
        self.world.barrier();
    }
    fn all_to_all_v(
        &self,
        send: &[f32],
        (send_counts, send_at): (&[usize], &[usize]),
        recv_counts: &[usize],
        recv: &mut [f32],
    ) {
        let sc: Vec<i32> = send_counts.iter().map(|&c| c as i32).collect();
        let sd: Vec<i32> = send_at.iter().map(|&d| d as i32).collect();
        let (rc, rd) = partition(recv_counts);
        let sendbuf = Partition::new(send, &sc[..], &sd[..]);
        let mut recvbuf = PartitionMut::new(recv, &rc[..], &rd[..]);
        self.world.all_to_all_varcount_into(&sendbuf, &mut recvbuf);
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        // Every rank passes a colour, so every rank gets a communicator.
        let world = self
            .world
            .split_by_color(Color::with_value(color as i32))
            .unwrap_or_else(|| unreachable!("a rank with a colour is in its group"));
        Arc::new(MpiCollective { world })
    }
    fn send(&self, to: usize, data: &[f32]) {
        self.world.process_at_rank(to as i32).send(data);
    }
    fn recv(&self, from: usize, len: usize) -> Vec<f32> {
        let mut buf = vec![0.0f32; len];
        self.world
            .process_at_rank(from as i32)
            .receive_into(&mut buf[..]);
        buf
    }
    fn send_recv(&self, to: usize, data: &[f32], from: usize, len: usize) -> Vec<f32> {
        let mut buf = vec![0.0f32; len];
        send_receive_into(
            data,
            &self.world.process_at_rank(to as i32),
            &mut buf[..],
            &self.world.process_at_rank(from as i32),
        );
        buf
    }
}
