// permute on CUDA: group the kept assignments (t, j) by expert, stable in (t, j) order.
//
//   key[i]   = expert_idx[i] if kept else E          (i = t*k + j, flat assignment index)
//   (key, i) sorted by key with a stable radix sort -> position p of every assignment
//   start[e] = first p with key >= e                 (e in [0, E]; start[E] = kept total)
//   tokens_per_expert[e] = start[e+1] - start[e]
//   row(p)   = p                                     (pad_to == 0)
//            = e*pad_to + (p - start[e])             (pad_to  > 0)
//   row_map[i] = row(p) or -1 when dropped; permuted[row] = x[i / k]; padding rows are zero.
//
// The only device->host copy here is N = start[E] when pad_to == 0 and keep is given (to
// allocate the output; without keep N = T·k). check_permute_args reads the expert_idx range
// (validate) and, with pad_to, the largest count from the device.
#ifdef MOE_PARALLEL_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/cub.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "rows.cuh"
#include "../ops.h"

namespace moe_parallel {
namespace {

using cuda_rows::kBlockThreads;

__global__ void make_keys_kernel(const int64_t* __restrict__ expert_idx,
                                 const bool* __restrict__ keep, int64_t n, int32_t num_experts,
                                 int32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool kept = keep == nullptr || keep[i];
    const int64_t e = expert_idx[i];
    CUDA_KERNEL_ASSERT(!kept || (e >= 0 && e < num_experts));
    keys[i] = kept ? static_cast<int32_t>(e) : num_experts;
    vals[i] = static_cast<int32_t>(i);
  }
}

// start[e] = first sorted position whose key >= e, for every e in [0, E]; each e written once.
__global__ void segment_starts_kernel(const int32_t* __restrict__ keys_sorted, int64_t n,
                                      int32_t num_experts, int32_t* __restrict__ start) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t hi = keys_sorted[p];
    const int32_t lo = p == 0 ? 0 : keys_sorted[p - 1] + 1;
    for (int32_t e = lo; e <= hi; ++e) start[e] = static_cast<int32_t>(p);
    if (p == n - 1) {
      for (int32_t e = hi + 1; e <= num_experts; ++e) start[e] = static_cast<int32_t>(n);
    }
  }
}

__global__ void counts_kernel(const int32_t* __restrict__ start, int32_t num_experts,
                              int64_t* __restrict__ tokens_per_expert) {
  for (int32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < num_experts;
       e += gridDim.x * blockDim.x) {
    tokens_per_expert[e] = start[e + 1] - start[e];
  }
}

__global__ void assign_rows_kernel(const int32_t* __restrict__ keys_sorted,
                                   const int32_t* __restrict__ vals_sorted,
                                   const int32_t* __restrict__ start, int64_t n,
                                   int32_t num_experts, int64_t k, int64_t pad_to,
                                   int64_t* __restrict__ row_map, int32_t* __restrict__ src_token) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = keys_sorted[p];
    const int32_t i = vals_sorted[p];
    if (e == num_experts) {
      row_map[i] = -1;
      continue;
    }
    CUDA_KERNEL_ASSERT(pad_to == 0 || p - start[e] < pad_to);
    const int64_t row = pad_to > 0 ? e * pad_to + (p - start[e]) : p;
    row_map[i] = row;
    src_token[row] = static_cast<int32_t>(i / k);
  }
}

// out[r] = x[src_token[r]], or zeros when src_token[r] < 0; rows copied as raw V words,
// kLoads loads in flight per thread before the matching stores.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int32_t* __restrict__ src_token,
                                   int64_t num_rows, int64_t vecs_per_row, V* __restrict__ out) {
  constexpr int kLoads = 4;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= num_rows) return;
  const int32_t s = src_token[r];
  V* dst = out + r * vecs_per_row;
  if (s < 0) {
    const V zero{};
    for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) dst[c] = zero;
    return;
  }
  const V* src = x + s * vecs_per_row;
  const int64_t stride = blockDim.x;
  for (int64_t c0 = threadIdx.x; c0 < vecs_per_row; c0 += kLoads * stride) {
    V buf[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (c0 + u * stride < vecs_per_row) buf[u] = src[c0 + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (c0 + u * stride < vecs_per_row) dst[c0 + u * stride] = buf[u];
    }
  }
}

template <typename V>
void launch_gather(const at::Tensor& x, const at::Tensor& src_token, at::Tensor& out,
                   cudaStream_t stream) {
  const int64_t rows = out.size(0);
  const int64_t vecs = out.size(1) * out.element_size() / static_cast<int64_t>(sizeof(V));
  const auto shape = cuda_rows::row_launch(rows, vecs);
  gather_rows_kernel<V><<<shape.grid, shape.block, 0, stream>>>(
      static_cast<const V*>(x.const_data_ptr()), src_token.const_data_ptr<int32_t>(), rows, vecs,
      static_cast<V*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(
    const at::Tensor& x, const at::Tensor& expert_idx, int64_t num_experts,
    const std::optional<at::Tensor>& keep, int64_t pad_to, bool validate) {
  check_permute_args(x, expert_idx, num_experts, keep, pad_to, validate);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t T = x.size(0);
  const int64_t H = x.size(1);
  const int64_t k = expert_idx.size(1);
  const int64_t n = T * k;
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(),
              "permute: T*k must be below 2^31 on CUDA, got ", n);
  TORCH_CHECK(num_experts < std::numeric_limits<int32_t>::max(),
              "permute: num_experts must be below 2^31 on CUDA, got ", num_experts);
  const auto E = static_cast<int32_t>(num_experts);

  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  at::Tensor keep_c;
  if (keep.has_value()) keep_c = keep->contiguous();

  const auto i32 = x.options().dtype(at::kInt);
  const auto i64 = x.options().dtype(at::kLong);
  at::Tensor start = at::empty({num_experts + 1}, i32);
  at::Tensor keys_sorted = at::empty({n}, i32);
  at::Tensor vals_sorted = at::empty({n}, i32);

  if (n > 0) {
    at::Tensor keys = at::empty({n}, i32);
    at::Tensor vals = at::empty({n}, i32);
    make_keys_kernel<<<cuda_rows::flat_blocks(n), kBlockThreads, 0, stream>>>(
        idx.const_data_ptr<int64_t>(), keep_c.defined() ? keep_c.const_data_ptr<bool>() : nullptr,
        n, E, keys.mutable_data_ptr<int32_t>(), vals.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // cub's radix sort is stable: equal experts keep ascending i = t*k + j.
    at::cuda::cub::radix_sort_pairs<int32_t, int32_t>(
        keys.const_data_ptr<int32_t>(), keys_sorted.mutable_data_ptr<int32_t>(),
        vals.const_data_ptr<int32_t>(), vals_sorted.mutable_data_ptr<int32_t>(), n,
        /*descending=*/false, /*begin_bit=*/0,
        /*end_bit=*/at::cuda::cub::get_num_bits(static_cast<uint64_t>(E)));
    segment_starts_kernel<<<cuda_rows::flat_blocks(n), kBlockThreads, 0, stream>>>(
        keys_sorted.const_data_ptr<int32_t>(), n, E, start.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    start.zero_();
  }

  at::Tensor tokens_per_expert = at::empty({num_experts}, i64);
  if (num_experts > 0) {
    counts_kernel<<<cuda_rows::flat_blocks(num_experts), kBlockThreads, 0, stream>>>(
        start.const_data_ptr<int32_t>(), E, tokens_per_expert.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // check_permute_args has already rejected counts above pad_to. Without keep every assignment
  // has a row (N = T·k, no host round-trip); with it, N is the kept count read back from start.
  const int64_t N = pad_to > 0      ? num_experts * pad_to
                    : !keep_c.defined() ? n
                                        : static_cast<int64_t>(start[num_experts].item<int32_t>());

  at::Tensor permuted = at::empty({N, H}, xc.options());
  at::Tensor row_map = at::empty({T, k}, i64);
  at::Tensor src_token = at::empty({N}, i32);
  if (pad_to > 0 && N > 0) src_token.fill_(-1);

  if (n > 0) {
    assign_rows_kernel<<<cuda_rows::flat_blocks(n), kBlockThreads, 0, stream>>>(
        keys_sorted.const_data_ptr<int32_t>(), vals_sorted.const_data_ptr<int32_t>(),
        start.const_data_ptr<int32_t>(), n, E, k, pad_to, row_map.mutable_data_ptr<int64_t>(),
        src_token.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (N > 0 && H > 0) {
    const int64_t row_bytes = H * xc.element_size();
    switch (cuda_rows::access_bytes(row_bytes, {xc.const_data_ptr(), permuted.const_data_ptr()})) {
      case 16: launch_gather<uint4>(xc, src_token, permuted, stream); break;
      case 8: launch_gather<uint2>(xc, src_token, permuted, stream); break;
      case 4: launch_gather<uint32_t>(xc, src_token, permuted, stream); break;
      default: launch_gather<uint16_t>(xc, src_token, permuted, stream); break;
    }
  }
  return {permuted, row_map, tokens_per_expert};
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA
