// unpermute (CPU): combine each token's expert outputs.
//   out[t] = sum_{j = 0..k-1, row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]],
//   w = probs (cast to the accumulation type) or 1. Accumulation is float32 (float64 for
//   float64 y), in the fixed order j = 0..k-1; each token is owned by one thread, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "parallel.h"

namespace moe_parallel {
namespace {

template <typename scalar_t>
void unpermute_kernel(const scalar_t* y, const int64_t* row_map,
                      const at::opmath_type<scalar_t>* w, scalar_t* out, int64_t T, int64_t k,
                      int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = num_chunks(T, T * std::max<int64_t>(k, 1) * H);
#pragma omp parallel num_threads(C) if (C > 1)
  {
    std::vector<acc_t> acc(H);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = row_map[t * k + j];
        if (r < 0) continue;
        const acc_t wt = w ? w[t * k + j] : acc_t(1);
        const scalar_t* yr = y + r * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += wt * static_cast<acc_t>(yr[h]);
      }
      scalar_t* o = out + t * H;
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
    }
  }
}

}  // namespace

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& row_map_in,
                         const std::optional<at::Tensor>& probs, int64_t num_tokens,
                         bool validate) {
  check_unpermute_args(y_in, row_map_in, probs, num_tokens, validate);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), H = y.size(1);
  const auto acc_dtype = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = probs.has_value() ? probs->to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor out = at::empty({T, H}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_kernel<scalar_t>(y.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(),
                               w.defined() ? w.data_ptr<acc_t>() : nullptr,
                               out.data_ptr<scalar_t>(), T, k, H);
  });
  return out;
}

}  // namespace moe_parallel
