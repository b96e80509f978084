//! NCCL on one GPU, a group of one (what `dsv3 ... --ep-wire nccl` under `mpirun -np 1` runs):
//! a unique id, a communicator, and the variable all-to-all to itself returns its bytes. Needs
//! a GPU and libnccl (the GPU check puts PyTorch's on the library path).

mod cuda_common;

use cuda_common::gpu;
use dsv3_kernels::cuda::nccl::NcclComm;

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_nccl_group_of_one_exchanges_with_itself() {
    let Some(_dev) = gpu("cuda_nccl_group_of_one_exchanges_with_itself") else { return };
    let id = NcclComm::unique_id().unwrap_or_else(|e| panic!("NCCL unique id: {e}"));
    let comm = NcclComm::new(0, 0, 1, &id).unwrap_or_else(|e| panic!("NCCL communicator: {e}"));
    for n in [0usize, 1, 4096, 3 << 20] {
        let send: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(comm.all_to_all_v(&send, &[n], &[n]).unwrap(), send, "{n} bytes");
    }
    assert!(comm.all_to_all_v(&[1, 2], &[1], &[2]).is_err(), "counts that do not cover the buffer");
}

#[test]
fn nccl_without_a_usable_gpu_is_a_typed_error() {
    // On a machine without a GPU (or a build without the feature) this is CudaUnavailable;
    // with a GPU and NCCL it works: either way never a panic.
    match NcclComm::unique_id() {
        Ok(id) => assert!(NcclComm::new(0, 1, 1, &id).is_err(), "rank 1 of 1"),
        Err(e) => assert!(matches!(e, dsv3_kernels::KernelError::CudaUnavailable(_)), "{e}"),
    }
}
