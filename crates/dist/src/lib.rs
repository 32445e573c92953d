//! One training job over several processes, one per device, possibly of different kinds and
//! speeds: the MPI communicator, the cluster file that maps ranks to devices, and `nuwa
//! launch`, which supervises `mpirun` and restarts a failed job from its last checkpoint.

pub mod cluster;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi_comm;

pub use cluster::{ClusterFile, RankSpec};
pub use launch::{launch, LaunchOptions};
