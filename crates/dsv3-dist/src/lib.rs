//! dsv3-dist: running dsv3 as one process per GPU or CPU socket under `mpirun`.
//!
//! * [`Launch::detect`]: whether this process was started by an MPI launcher, and as which
//!   rank (from the launcher's environment, before MPI starts).
//! * [`MpiWorld`]: MPI itself (feature `mpi`): a [`dsv3_runtime::dist::Comm`] over the world
//!   communicator for the pipeline, and per pipeline stage an expert-parallel
//!   [`dsv3_moe::Transport`] over a split communicator ([`EpWire::Mpi`]: MPI all-to-alls of
//!   the host rows, the dispatch de-duplicated per destination, see [`dsv3_moe::wire`]; or
//!   [`EpWire::Nccl`]: the rows through NCCL on the GPU, its unique id broadcast over MPI).
//!
//! **When a rank fails.** A rank that fails while the job runs prints its error and calls
//! `MPI_Abort`; `mpirun` then sends SIGTERM to every other rank, and a watcher thread started
//! with the world prints, on each of them, that the job was aborted because another rank
//! failed, and exits. A rank that dies (killed, crashed) gets the same treatment from
//! `mpirun`. No rank waits forever on a peer that is gone.
//!
//! Without the `mpi` feature the same API exists and [`MpiWorld::init`] returns a typed
//! error, so `dsv3` without MPI refuses to run as one of several ranks instead of running
//! the whole job once per process.
#![forbid(unsafe_code)]

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(not(feature = "mpi"))]
mod no_mpi;

#[cfg(feature = "mpi")]
pub use mpi_comm::{MpiComm, MpiWorld};
#[cfg(not(feature = "mpi"))]
pub use no_mpi::{MpiComm, MpiWorld};

/// How the expert-parallel all-to-alls move their rows between the ranks of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EpWire {
    /// MPI all-to-alls of host buffers.
    #[default]
    Mpi,
    /// NCCL grouped send/recv on GPU `device` (the unique id is broadcast over MPI).
    Nccl { device: usize },
}

/// How this process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// On its own (or by a launcher with one process).
    Single,
    /// As rank `rank` of `size` processes (`local_rank` among those on its node).
    Mpi { rank: usize, size: usize, local_rank: usize },
}

impl Launch {
    /// Reads the launcher's environment: Open MPI (`OMPI_COMM_WORLD_*`), PMIx (`PMIX_RANK`
    /// with `OMPI_COMM_WORLD_SIZE`), MPICH / Intel MPI (`PMI_RANK`, `PMI_SIZE`). A size of 1 is
    /// [`Launch::Single`].
    pub fn detect() -> Launch {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::detect`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Launch {
        let num = |k: &str| var(k).and_then(|v| v.trim().parse::<usize>().ok());
        let found = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ]
        .iter()
        .find_map(|&(r, s, l)| Some((num(r)?, num(s)?, num(l).unwrap_or(0))));
        match found {
            Some((rank, size, local_rank)) if size > 1 && rank < size => Launch::Mpi { rank, size, local_rank },
            _ => Launch::Single,
        }
    }

    /// This process's rank (0 when single).
    pub fn rank(&self) -> usize {
        match self {
            Launch::Single => 0,
            Launch::Mpi { rank, .. } => *rank,
        }
    }

    /// This process's rank among those on its node (0 when single).
    pub fn local_rank(&self) -> usize {
        match self {
            Launch::Single => 0,
            Launch::Mpi { local_rank, .. } => *local_rank,
        }
    }

    /// Processes in the job.
    pub fn size(&self) -> usize {
        match self {
            Launch::Single => 1,
            Launch::Mpi { size, .. } => *size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Launch;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Launch {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn launchers_are_recognised_from_their_environment() {
        assert_eq!(launch(&[]), Launch::Single);
        let ompi = [("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")];
        assert_eq!(launch(&ompi), Launch::Mpi { rank: 2, size: 4, local_rank: 0 });
        assert_eq!(launch(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]), Launch::Mpi { rank: 1, size: 2, local_rank: 0 });
        assert_eq!(launch(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")]), Launch::Single);
        assert_eq!(launch(&[("OMPI_COMM_WORLD_RANK", "5"), ("OMPI_COMM_WORLD_SIZE", "4")]), Launch::Single);
        assert_eq!(launch(&ompi).size(), 4);
    }
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
