//! A build without the `mpi` feature: the same API, and [`MpiWorld::init`] is a typed error.

use crate::EpWire;
use dsv3_moe::Transport;
use dsv3_runtime::Result;
use dsv3_runtime::dist::{Comm, Layout, Tag, dist_err};
use std::convert::Infallible;
use std::fmt::Display;

/// Never constructed without the `mpi` feature.
#[derive(Debug)]
pub struct MpiWorld(Infallible);

/// Never constructed without the `mpi` feature.
#[derive(Debug)]
pub struct MpiComm<'w>(Infallible, std::marker::PhantomData<&'w ()>);

impl MpiWorld {
    pub fn init() -> Result<MpiWorld> {
        let detail = "this dsv3 was built without MPI: rebuild with `--features mpi` (scripts/install-mpi.sh installs OpenMPI first)";
        Err(dist_err(crate::Launch::detect().rank(), detail))
    }
    pub fn rank(&self) -> usize {
        match self.0 {}
    }
    pub fn size(&self) -> usize {
        match self.0 {}
    }
    pub fn comm(&self, _layout: Layout, _wire: EpWire) -> Result<MpiComm<'_>> {
        match self.0 {}
    }
    pub fn abort(&self, _err: &dyn Display) -> ! {
        match self.0 {}
    }
}

impl Comm for MpiComm<'_> {
    fn rank(&self) -> usize {
        match self.0 {}
    }
    fn size(&self) -> usize {
        match self.0 {}
    }
    fn exchange(&self, _tag: Tag, _sends: &[(usize, &[u8])], _from: &[usize]) -> Result<Vec<Vec<u8>>> {
        match self.0 {}
    }
    fn ep(&self) -> &dyn Transport {
        match self.0 {}
    }
}
