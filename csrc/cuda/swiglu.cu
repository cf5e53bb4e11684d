// swiglu, clamped_swiglu and their backwards on CUDA (formulas in csrc/cpu/swiglu.cpp).
// h [N, 2F] = [gate | up].
// One thread group per row (cuda_rows::row_launch); each thread handles VEC consecutive
// columns of gate, up and the output with 16-byte accesses when F and the pointers allow.
// Math in float (double for float64); each element is written once, no atomics.
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

using cuda_rows::Pack;

__device__ __forceinline__ float sigmoid_of(float g) { return 1.0f / (1.0f + expf(-g)); }
__device__ __forceinline__ double sigmoid_of(double g) { return 1.0 / (1.0 + exp(-g)); }

// BACKWARD = false: out = act(gate, up).  BACKWARD = true: grad_h from grad_out (go).
// CLAMPED = false: act = silu(gate) * up.  CLAMPED = true (GPT-OSS): with g = min(gate, L),
// u = clamp(up, -L, L), s = sigmoid(alpha g): act = (u + 1) g s, zero gradient where clamped.
template <typename scalar_t, int VEC, bool BACKWARD, bool CLAMPED>
__global__ void swiglu_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ go,
                              scalar_t* __restrict__ out, int64_t N, int64_t vecs_per_row,
                              double alpha, double limit) {
  using P = Pack<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= N) return;
  const acc_t a = static_cast<acc_t>(alpha), L = static_cast<acc_t>(limit);
  const P* gate = reinterpret_cast<const P*>(h) + r * 2 * vecs_per_row;
  const P* up = gate + vecs_per_row;
  for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) {
    const P g = gate[c], u = up[c];
    if constexpr (BACKWARD) {
      const P d = reinterpret_cast<const P*>(go)[r * vecs_per_row + c];
      P rg, ru;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t graw = static_cast<acc_t>(g.v[i]), uraw = static_cast<acc_t>(u.v[i]);
        if constexpr (CLAMPED) {
          const acc_t gv = graw < L ? graw : L;
          const acc_t uv = uraw < -L ? -L : (uraw > L ? L : uraw);
          const acc_t s = sigmoid_of(a * gv);
          const acc_t dv = static_cast<acc_t>(d.v[i]);
          const acc_t dg = dv * (uv + acc_t(1)) * s * (acc_t(1) + a * gv * (acc_t(1) - s));
          rg.v[i] = static_cast<scalar_t>(graw < L ? dg : acc_t(0));
          ru.v[i] = static_cast<scalar_t>(uraw > -L && uraw < L ? dv * gv * s : acc_t(0));
        } else {
          const acc_t s = sigmoid_of(graw);
          const acc_t ds = static_cast<acc_t>(d.v[i]) * s;
          const acc_t slope = acc_t(1) + graw * (acc_t(1) - s);
          rg.v[i] = static_cast<scalar_t>(ds * uraw * slope);
          ru.v[i] = static_cast<scalar_t>(ds * graw);
        }
      }
      P* gg = reinterpret_cast<P*>(out) + r * 2 * vecs_per_row;
      gg[c] = rg;
      gg[vecs_per_row + c] = ru;
    } else {
      P res;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t gv = static_cast<acc_t>(g.v[i]), uv = static_cast<acc_t>(u.v[i]);
        if constexpr (CLAMPED) {
          const acc_t gc = gv < L ? gv : L;
          const acc_t uc = uv < -L ? -L : (uv > L ? L : uv);
          res.v[i] = static_cast<scalar_t>((uc + acc_t(1)) * gc * sigmoid_of(a * gc));
        } else {
          res.v[i] = static_cast<scalar_t>(gv * sigmoid_of(gv) * uv);
        }
      }
      reinterpret_cast<P*>(out)[r * vecs_per_row + c] = res;
    }
  }
}

// Launches swiglu_kernel with 16-byte accesses when F and every pointer allow it, else 1.
template <typename scalar_t, bool BACKWARD, bool CLAMPED>
void launch(const scalar_t* h, const scalar_t* go, scalar_t* out, int64_t N, int64_t F,
            cudaStream_t stream, double alpha = 1.0, double limit = 0.0) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool packed = F % kVec == 0 &&
      cuda_rows::access_bytes(F * sizeof(scalar_t), {h, go, out}) == 16;
  if (packed) {
    const auto l = cuda_rows::row_launch(N, F / kVec);
    swiglu_kernel<scalar_t, kVec, BACKWARD, CLAMPED><<<l.grid, l.block, 0, stream>>>(
        h, go, out, N, F / kVec, alpha, limit);
  } else {
    const auto l = cuda_rows::row_launch(N, F);
    swiglu_kernel<scalar_t, 1, BACKWARD, CLAMPED><<<l.grid, l.block, 0, stream>>>(
        h, go, out, N, F, alpha, limit);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool CLAMPED>
at::Tensor forward(const at::Tensor& h_in, double alpha, double limit) {
  check_swiglu_args(h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor out = at::empty({N, F}, h.options());
  if (N == 0 || F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu", [&] {
    launch<scalar_t, false, CLAMPED>(h.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), N, F,
                                     at::cuda::getCurrentCUDAStream(), alpha, limit);
  });
  return out;
}

template <bool CLAMPED>
at::Tensor backward(const at::Tensor& grad_out_in, const at::Tensor& h_in, double alpha,
                    double limit) {
  check_swiglu_backward_args(grad_out_in, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = at::empty_like(h);
  if (N == 0 || F == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_bwd", [&] {
    launch<scalar_t, true, CLAMPED>(h.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(),
                                    grad_h.data_ptr<scalar_t>(), N, F,
                                    at::cuda::getCurrentCUDAStream(), alpha, limit);
  });
  return grad_h;
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& h) { return forward<false>(h, 1.0, 0.0); }

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& h) {
  return backward<false>(grad_out, h, 1.0, 0.0);
}

at::Tensor clamped_swiglu_cuda(const at::Tensor& h, double alpha, double limit) {
  return forward<true>(h, alpha, limit);
}

at::Tensor clamped_swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& h,
                                        double alpha, double limit) {
  return backward<true>(grad_out, h, alpha, limit);
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA
