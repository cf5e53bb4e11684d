// unpermute_backward (CPU): gradients of out[t] = sum_j w[t,j] * y[row_map[t,j]].
//   grad_y[row_map[t,j]] = w[t,j] * grad_out[t]; rows no (t,j) points at are zero.
//   grad_probs[t,j] = <grad_out[t], y[row_map[t,j]]> (0 where row_map == -1), accumulated in
//   float32 (float64 for float64 y) in SIMD lanes (a fixed order for a given build) and
//   returned in probs' dtype; an empty [0] tensor of y's
//   dtype when probs is None.
// Relies on the contract that each row is the target of at most one (t, j): threads own
// tokens, so their writes to grad_y rows never overlap.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ops.h"
#include "parallel.h"

namespace moe_parallel {
namespace {

template <typename scalar_t>
void unpermute_backward_kernel(const scalar_t* grad_out, const scalar_t* y,
                               const int64_t* row_map, const at::opmath_type<scalar_t>* w,
                               scalar_t* grad_y, at::opmath_type<scalar_t>* grad_w, int64_t T,
                               int64_t k, int64_t H, int64_t num_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<unsigned char> referenced(num_rows, 0);
  const int64_t C = num_chunks(T, T * std::max<int64_t>(k, 1) * H);
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* g = grad_out + t * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      const int64_t r = row_map[i];
      if (r < 0) {
        if (grad_w) grad_w[i] = acc_t(0);
        continue;
      }
      referenced[r] = 1;
      const acc_t wt = w ? w[i] : acc_t(1);
      scalar_t* gy = grad_y + r * H;
      for (int64_t h = 0; h < H; ++h) gy[h] = static_cast<scalar_t>(wt * static_cast<acc_t>(g[h]));
      if (grad_w) {
        const scalar_t* yr = y + r * H;
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) dot += static_cast<acc_t>(g[h]) * static_cast<acc_t>(yr[h]);
        grad_w[i] = dot;
      }
    }
  }
  const int64_t CR = num_chunks(num_rows, num_rows * H);
#pragma omp parallel for schedule(static) num_threads(CR) if (CR > 1)
  for (int64_t r = 0; r < num_rows; ++r) {
    if (!referenced[r] && H > 0) std::memset(grad_y + r * H, 0, H * sizeof(scalar_t));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& row_map_in,
    const std::optional<at::Tensor>& probs, int64_t num_rows, bool validate) {
  check_unpermute_backward_args(grad_out_in, y_in, row_map_in, probs, num_rows, validate);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), H = y.size(1);
  const auto acc_dtype = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = probs.has_value() ? probs->to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor grad_y = at::empty({num_rows, H}, y.options());
  at::Tensor grad_w = probs.has_value() ? at::empty({T, k}, w.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        unpermute_backward_kernel<scalar_t>(
            grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(),
            w.defined() ? w.data_ptr<acc_t>() : nullptr, grad_y.data_ptr<scalar_t>(),
            grad_w.defined() ? grad_w.data_ptr<acc_t>() : nullptr, T, k, H, num_rows);
      });
  at::Tensor grad_probs =
      probs.has_value() ? grad_w.to(probs->scalar_type()) : at::empty({0}, y.options());
  return {grad_y, grad_probs};
}

}  // namespace moe_parallel
