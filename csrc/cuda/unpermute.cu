// unpermute and its backward on CUDA. acc_t = float (double for float64 y); w[t,j] = probs[t,j]
// converted to acc_t, or 1 when probs is None.
//
// forward:  out[t] = sum_{j=0..k-1, row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]]
//           one thread group per token, j in fixed ascending order, no atomics.
// backward: grad_y[row_map[t,j]] = w[t,j] * grad_out[t]; rows no (t,j) refers to are zero.
//           grad_probs[t,j] = <grad_out[t], y[row_map[t,j]]>, 0 where row_map[t,j] == -1;
//           a fixed-shape shuffle/shared-memory tree per (t,j), so results are deterministic.
#ifdef MOE_PARALLEL_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "rows.cuh"
#include "../ops.h"

namespace moe_parallel {
namespace {

using cuda_rows::kBlockThreads;
using cuda_rows::Pack;

constexpr int kLoads = 4;     // unpermute: rows each thread loads before accumulating
constexpr int kBwdLoads = 2;  // unpermute_backward: vectors each thread loads per batch

template <typename scalar_t, typename acc_t, int VEC, bool HAS_PROBS>
__global__ void unpermute_kernel(const scalar_t* __restrict__ y,
                                 const int64_t* __restrict__ row_map,
                                 const acc_t* __restrict__ probs, int64_t T, int64_t k,
                                 int64_t vecs_per_row, scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (t >= T) return;
  const int64_t* rm = row_map + t * k;
  const P* yv = reinterpret_cast<const P*>(y);
  P* dst = reinterpret_cast<P*>(out) + t * vecs_per_row;
  for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = acc_t(0);
    // kLoads rows are loaded before they are accumulated, still in ascending j.
    for (int64_t j0 = 0; j0 < k; j0 += kLoads) {
      P v[kLoads];
      int64_t r[kLoads];
#pragma unroll
      for (int b = 0; b < kLoads; ++b) {
        r[b] = j0 + b < k ? rm[j0 + b] : -1;
        if (r[b] >= 0) v[b] = yv[r[b] * vecs_per_row + c];
      }
#pragma unroll
      for (int b = 0; b < kLoads; ++b) {
        if (r[b] < 0) continue;
        if constexpr (HAS_PROBS) {
          const acc_t w = probs[t * k + j0 + b];
#pragma unroll
          for (int u = 0; u < VEC; ++u) acc[u] += w * static_cast<acc_t>(v[b].v[u]);
        } else {
#pragma unroll
          for (int u = 0; u < VEC; ++u) acc[u] += static_cast<acc_t>(v[b].v[u]);
        }
      }
    }
    P o;
#pragma unroll
    for (int u = 0; u < VEC; ++u) o.v[u] = static_cast<scalar_t>(acc[u]);
    dst[c] = o;
  }
}

// Sum of v over the blockDim.x threads sharing threadIdx.y. Every thread of the block must
// call it (shuffles use the full mask; groups wider than a warp meet in shared memory).
template <typename acc_t>
__device__ acc_t group_sum(acc_t v, acc_t* smem) {
  const int tpr = blockDim.x;
  const int width = tpr < 32 ? tpr : 32;
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (tpr <= 32) return v;
  const int warps_per_row = tpr / 32;
  const int slot = threadIdx.y * warps_per_row + threadIdx.x / 32;
  __syncthreads();  // smem may still be read by the previous call
  if (threadIdx.x % 32 == 0) smem[slot] = v;
  __syncthreads();
  acc_t s = acc_t(0);
  for (int w = 0; w < warps_per_row; ++w) s += smem[threadIdx.y * warps_per_row + w];
  return s;
}

template <typename scalar_t, typename acc_t, int VEC, bool HAS_PROBS>
__global__ void unpermute_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
    const int64_t* __restrict__ row_map, const acc_t* __restrict__ probs, int64_t T, int64_t k,
    int64_t vecs_per_row, scalar_t* __restrict__ grad_y, acc_t* __restrict__ grad_probs) {
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t smem[kBlockThreads / 32];
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  const bool active = t < T;  // inactive threads still join group_sum
  const P* gv = reinterpret_cast<const P*>(grad_out) + t * vecs_per_row;
  const P* yv = reinterpret_cast<const P*>(y);
  P* gy = reinterpret_cast<P*>(grad_y);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t r = active ? row_map[t * k + j] : -1;
    acc_t dot = acc_t(0);
    if (r >= 0) {
      const acc_t w = HAS_PROBS ? probs[t * k + j] : acc_t(1);
      const int64_t stride = blockDim.x;
      for (int64_t c0 = threadIdx.x; c0 < vecs_per_row; c0 += kBwdLoads * stride) {
        P g[kBwdLoads], yr[kBwdLoads];
#pragma unroll
        for (int b = 0; b < kBwdLoads; ++b) {
          const int64_t c = c0 + b * stride;
          if (c < vecs_per_row) {
            g[b] = gv[c];
            if constexpr (HAS_PROBS) yr[b] = yv[r * vecs_per_row + c];
          }
        }
#pragma unroll
        for (int b = 0; b < kBwdLoads; ++b) {
          const int64_t c = c0 + b * stride;
          if (c >= vecs_per_row) continue;
          P o;
#pragma unroll
          for (int u = 0; u < VEC; ++u) {
            o.v[u] = static_cast<scalar_t>(w * static_cast<acc_t>(g[b].v[u]));
          }
          gy[r * vecs_per_row + c] = o;
          if constexpr (HAS_PROBS) {
#pragma unroll
            for (int u = 0; u < VEC; ++u) {
              dot += static_cast<acc_t>(g[b].v[u]) * static_cast<acc_t>(yr[b].v[u]);
            }
          }
        }
      }
    }
    if constexpr (HAS_PROBS) {
      dot = group_sum(dot, smem);
      if (active && threadIdx.x == 0) grad_probs[t * k + j] = r >= 0 ? dot : acc_t(0);
    }
  }
}

// referenced[row_map[i]] = 1 for every kept assignment i.
__global__ void mark_rows_kernel(const int64_t* __restrict__ row_map, int64_t n,
                                 int32_t* __restrict__ referenced) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_map[i];
    if (r >= 0) referenced[r] = 1;
  }
}

// out[r] = 0 for every row with referenced[r] == 0; rows written as raw V words.
template <typename V>
__global__ void zero_unreferenced_rows_kernel(const int32_t* __restrict__ referenced,
                                              int64_t num_rows, int64_t vecs_per_row,
                                              V* __restrict__ out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= num_rows || referenced[r] != 0) return;
  const V zero{};
  V* dst = out + r * vecs_per_row;
  for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) dst[c] = zero;
}

template <typename V>
void launch_zero_unreferenced(const at::Tensor& referenced, at::Tensor& out, cudaStream_t stream) {
  const int64_t rows = out.size(0);
  const int64_t vecs = out.size(1) * out.element_size() / static_cast<int64_t>(sizeof(V));
  const auto shape = cuda_rows::row_launch(rows, vecs);
  zero_unreferenced_rows_kernel<V><<<shape.grid, shape.block, 0, stream>>>(
      referenced.const_data_ptr<int32_t>(), rows, vecs, static_cast<V*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Probabilities as a contiguous acc_t tensor (undefined when absent).
at::Tensor probs_as(const std::optional<at::Tensor>& probs, at::ScalarType acc_type) {
  if (!probs.has_value()) return at::Tensor();
  return probs->to(acc_type).contiguous();
}

// 16-byte packs need H to be a multiple of the pack and every row base 16-byte aligned.
bool packs_fit(int64_t H, int vec, std::initializer_list<const void*> ptrs) {
  bool ok = H % vec == 0;
  for (const void* p : ptrs) ok = ok && cuda_rows::is_aligned(p, 16);
  return ok;
}

template <typename scalar_t, int VEC>
void launch_unpermute(const at::Tensor& y, const at::Tensor& rm, const at::Tensor& w,
                      at::Tensor& out, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = rm.size(0), k = rm.size(1);
  const int64_t vecs = out.size(1) / VEC;
  const auto shape = cuda_rows::row_launch(T, vecs);
  if (w.defined()) {
    unpermute_kernel<scalar_t, acc_t, VEC, true><<<shape.grid, shape.block, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), rm.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
        T, k, vecs, out.mutable_data_ptr<scalar_t>());
  } else {
    unpermute_kernel<scalar_t, acc_t, VEC, false><<<shape.grid, shape.block, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), rm.const_data_ptr<int64_t>(), nullptr, T, k, vecs,
        out.mutable_data_ptr<scalar_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_unpermute_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& rm,
                               const at::Tensor& w, at::Tensor& grad_y, at::Tensor& grad_w,
                               cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = rm.size(0), k = rm.size(1);
  const int64_t vecs = g.size(1) / VEC;
  const auto shape = cuda_rows::row_launch(T, vecs);
  if (w.defined()) {
    unpermute_backward_kernel<scalar_t, acc_t, VEC, true><<<shape.grid, shape.block, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rm.const_data_ptr<int64_t>(),
        w.const_data_ptr<acc_t>(), T, k, vecs, grad_y.mutable_data_ptr<scalar_t>(),
        grad_w.mutable_data_ptr<acc_t>());
  } else {
    unpermute_backward_kernel<scalar_t, acc_t, VEC, false><<<shape.grid, shape.block, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rm.const_data_ptr<int64_t>(),
        nullptr, T, k, vecs, grad_y.mutable_data_ptr<scalar_t>(), nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& probs, int64_t num_tokens,
                          bool validate) {
  check_unpermute_args(y, row_map, probs, num_tokens, validate);
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor yc = y.contiguous();
  const at::Tensor rm = row_map.contiguous();
  const int64_t H = yc.size(1);
  at::Tensor out = at::empty({num_tokens, H}, yc.options());
  if (num_tokens == 0 || H == 0) return out;
  const at::ScalarType acc_type = yc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = probs_as(probs, acc_type);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "unpermute", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (packs_fit(H, kVec, {yc.const_data_ptr(), out.const_data_ptr()})) {
      launch_unpermute<scalar_t, kVec>(yc, rm, w, out, stream);
    } else {
      launch_unpermute<scalar_t, 1>(yc, rm, w, out, stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_map,
    const std::optional<at::Tensor>& probs, int64_t num_rows, bool validate) {
  check_unpermute_backward_args(grad_out, y, row_map, probs, num_rows, validate);
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor go = grad_out.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor rm = row_map.contiguous();
  const int64_t T = rm.size(0);
  const int64_t k = rm.size(1);
  const int64_t H = yc.size(1);
  const at::ScalarType acc_type = yc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = probs_as(probs, acc_type);

  at::Tensor grad_y = at::empty({num_rows, H}, yc.options());
  at::Tensor grad_w = w.defined() ? at::empty({T, k}, w.options()) : at::Tensor();

  // Rows that no (t, j) refers to are zero; the others are written once by the main kernel.
  if (num_rows > 0 && H > 0) {
    at::Tensor referenced = at::zeros({num_rows}, yc.options().dtype(at::kInt));
    if (T * k > 0) {
      mark_rows_kernel<<<cuda_rows::flat_blocks(T * k), kBlockThreads, 0, stream>>>(
          rm.const_data_ptr<int64_t>(), T * k, referenced.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    switch (cuda_rows::access_bytes(H * yc.element_size(), {grad_y.const_data_ptr()})) {
      case 16: launch_zero_unreferenced<uint4>(referenced, grad_y, stream); break;
      case 8: launch_zero_unreferenced<uint2>(referenced, grad_y, stream); break;
      case 4: launch_zero_unreferenced<uint32_t>(referenced, grad_y, stream); break;
      default: launch_zero_unreferenced<uint16_t>(referenced, grad_y, stream); break;
    }
  }

  if (T > 0 && k > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, yc.scalar_type(), "unpermute_backward", [&] {
          constexpr int kVec = 16 / sizeof(scalar_t);
          if (packs_fit(H, kVec, {go.const_data_ptr(), yc.const_data_ptr(),
                                  grad_y.const_data_ptr()})) {
            launch_unpermute_backward<scalar_t, kVec>(go, yc, rm, w, grad_y, grad_w, stream);
          } else {
            launch_unpermute_backward<scalar_t, 1>(go, yc, rm, w, grad_y, grad_w, stream);
          }
        });
  }

  if (!w.defined()) return {grad_y, at::empty({0}, yc.options())};
  return {grad_y, grad_w.to(probs->scalar_type())};
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA
