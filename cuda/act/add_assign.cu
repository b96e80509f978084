// acc += x element-wise (Backend::add_assign: residual and shared-expert sums), one f32 add
// per element: bit-exact with the CPU.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_add_assign(const dsv3_add_assign_params p) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x)
    p.acc[i] = dsv3::add_rn(p.acc[i], p.x[i]);
}
