// expert_dropout on CUDA (formula in csrc/cpu/dropout.cpp, hash in csrc/dropout_hash.h): the same
// keep bits and the same rounding as the CPU kernel, so both give bitwise-equal results.
// One thread group per row (cuda_rows::row_launch); the row's group is found by a binary search
// over the group starts (copied to the device from pinned memory, no host sync); each thread
// strides over the row's columns. Each element is written once, no atomics.
#ifdef MOE_PARALLEL_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

#include "../dropout_hash.h"
#include "../ops.h"
#include "rows.cuh"

namespace moe_parallel {
namespace {

template <typename scalar_t>
__global__ void expert_dropout_kernel(const scalar_t* __restrict__ a,
                                      const int64_t* __restrict__ hash,
                                      const int64_t* __restrict__ starts, int64_t G,
                                      scalar_t* __restrict__ out, int64_t N, int64_t F,
                                      int64_t first_expert, int64_t unit_offset, uint64_t thr,
                                      at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= N) return;
  // the group g with starts[g] <= r < starts[g + 1] (starts[0] = 0, starts[G] = N)
  int64_t lo = 0, hi = G;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (starts[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const uint32_t key = dropout_hash::row_key(static_cast<uint32_t>(static_cast<uint64_t>(hash[r])),
                                             static_cast<uint32_t>(first_expert + lo));
  const scalar_t* x = a + r * F;
  scalar_t* o = out + r * F;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    const uint32_t bits = dropout_hash::unit_bits(key, static_cast<uint32_t>(unit_offset + j));
    o[j] = static_cast<uint64_t>(bits) >= thr
               ? static_cast<scalar_t>(static_cast<acc_t>(x[j]) * scale)
               : static_cast<scalar_t>(0);
  }
}

}  // namespace

at::Tensor expert_dropout_cuda(const at::Tensor& a_in, const at::Tensor& row_hash_in,
                               const at::Tensor& group_sizes_in, int64_t first_expert,
                               int64_t unit_offset, double p) {
  check_expert_dropout_args(a_in, row_hash_in, group_sizes_in, first_expert, unit_offset, p);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor hash = row_hash_in.contiguous();
  const at::Tensor group_sizes = group_sizes_in.contiguous();
  const int64_t N = a.size(0), F = a.size(1), G = group_sizes.size(0);
  at::Tensor out = at::empty_like(a);
  if (N == 0 || F == 0) return out;
  const std::vector<int64_t> starts = group_row_starts(group_sizes.data_ptr<int64_t>(), G);
  at::Tensor host = at::empty({G + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), starts.data(), (G + 1) * sizeof(int64_t));
  const at::Tensor dev = host.to(a.device(), /*non_blocking=*/true);
  const uint64_t thr = dropout_hash::threshold(p);
  const double scale = 1.0 / (1.0 - p);
  const auto l = cuda_rows::row_launch(N, F);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "expert_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    expert_dropout_kernel<scalar_t><<<l.grid, l.block, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), hash.const_data_ptr<int64_t>(),
        dev.const_data_ptr<int64_t>(), G, out.data_ptr<scalar_t>(), N, F, first_expert,
        unit_offset, thr, static_cast<acc_t>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA
