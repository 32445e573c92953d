//! [`Collective`] over MPI (the `mpi` crate): fp32 sums and f64 gathers through host memory,
//! so ranks on CUDA, ROCm and CPU devices can share one job.

use anyhow::{anyhow, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use nuwa_train::parallel::Collective;

pub struct MpiCollective {
    world: SimpleCommunicator,
    // Finalises MPI when dropped, so it must outlive `world`.
    _universe: Universe,
}

impl MpiCollective {
    /// Initialises MPI; fails when it was already initialised or nuwa was not started by
    /// `mpirun`-like tooling that MPI understands.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI could not be initialised"))?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }
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
}
