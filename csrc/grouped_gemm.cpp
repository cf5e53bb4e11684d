// Grouped GEMM over consecutive row groups of a (group g = the next group_sizes[g] rows):
//   grouped_gemm:       out_g = a_g @ b[g]            (b [G,K,N])
//                       out_g = a_g @ b[g]^T          (b [G,N,K], trans_b)
//   grouped_gemm_wgrad: grad_b[g] = a_g^T @ grad_out_g        ([G,K,N])
//                       grad_b[g] = grad_out_g^T @ a_g        ([G,N,K], trans_b)
//                       zero for empty groups.
// One at::mm_out per group into a view of the output: BLAS on CPU, cuBLAS on CUDA.
#include "ops.h"

namespace moe_parallel {

at::Tensor grouped_gemm_impl(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b) {
  check_grouped_gemm_args(a, b, group_sizes, trans_b);
  const int64_t G = b.size(0), N = trans_b ? b.size(1) : b.size(2);
  const at::Tensor sizes = group_sizes.contiguous();
  const int64_t* gs = sizes.data_ptr<int64_t>();
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  int64_t row = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (gs[g] > 0) {
      const at::Tensor bg = trans_b ? b.select(0, g).t() : b.select(0, g);
      at::Tensor dst = out.narrow(0, row, gs[g]);
      at::mm_out(dst, a.narrow(0, row, gs[g]), bg);
    }
    row += gs[g];
  }
  return out;
}

at::Tensor grouped_gemm_wgrad_impl(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes, bool trans_b) {
  check_grouped_gemm_wgrad_args(a, grad_out, group_sizes);
  const int64_t G = group_sizes.size(0), K = a.size(1), N = grad_out.size(1);
  const at::Tensor sizes = group_sizes.contiguous();
  const int64_t* gs = sizes.data_ptr<int64_t>();
  at::Tensor grad_b = trans_b ? at::empty({G, N, K}, a.options()) : at::empty({G, K, N}, a.options());
  int64_t row = 0;
  for (int64_t g = 0; g < G; ++g) {
    at::Tensor dst = grad_b.select(0, g);
    if (gs[g] == 0) {
      dst.zero_();
      continue;
    }
    const at::Tensor a_g = a.narrow(0, row, gs[g]);
    const at::Tensor go_g = grad_out.narrow(0, row, gs[g]);
    if (trans_b) {
      at::mm_out(dst, go_g.t(), a_g);
    } else {
      at::mm_out(dst, a_g.t(), go_g);
    }
    row += gs[g];
  }
  return grad_b;
}

}  // namespace moe_parallel
