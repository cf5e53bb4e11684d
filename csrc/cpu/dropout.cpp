// expert_dropout (CPU): inverted dropout on the experts' hidden activation with a mask that is a
// pure function of (row hash, global expert, global hidden unit) (csrc/dropout_hash.h).
//   a [N, F] rows grouped by local expert (group_sizes [G] CPU int64, sum N); row r of group g
//   belongs to global expert e = first_expert + g; column j is global hidden unit
//   unit_offset + j; u = row_hash[r] mod 2^32.
//   out[r, j] = a[r, j] * s   if bits(u, e, unit_offset + j) >= floor(p * 2^32),  else 0,
//   s = 1 / (1 - p) rounded to the math type (float32; float64 for float64), the product
//   computed in that type and rounded once to a's dtype.
// The mask does not depend on the rows' order, the padding, the threads or the device; the op
// is its own adjoint (backward = the same op on the gradient). Rows are split over OpenMP
// threads; every element is computed once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dropout_hash.h"
#include "../ops.h"
#include "parallel.h"

namespace moe_parallel {
namespace {

template <typename scalar_t>
void dropout_rows(const scalar_t* a, const int64_t* hash, scalar_t* out, int64_t r0, int64_t r1,
                  int64_t F, const std::vector<int64_t>& starts, int64_t first_expert,
                  int64_t unit_offset, uint64_t thr, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  // the group of row r0: starts[g] <= r0 < starts[g + 1] (empty groups skipped)
  int64_t g = std::upper_bound(starts.begin(), starts.end(), r0) - starts.begin() - 1;
  for (int64_t r = r0; r < r1; ++r) {
    while (r >= starts[g + 1]) ++g;
    const uint32_t key = dropout_hash::row_key(
        static_cast<uint32_t>(static_cast<uint64_t>(hash[r])),
        static_cast<uint32_t>(first_expert + g));
    const scalar_t* x = a + r * F;
    scalar_t* o = out + r * F;
    for (int64_t j = 0; j < F; ++j) {
      const uint32_t bits = dropout_hash::unit_bits(key, static_cast<uint32_t>(unit_offset + j));
      o[j] = static_cast<uint64_t>(bits) >= thr
                 ? static_cast<scalar_t>(static_cast<acc_t>(x[j]) * scale)
                 : static_cast<scalar_t>(0);
    }
  }
}

// dropout_rows over contiguous row ranges covering [0, N), one per OpenMP thread.
template <typename scalar_t>
void dropout_all_rows(const scalar_t* a, const int64_t* hash, scalar_t* out, int64_t N,
                      int64_t F, const std::vector<int64_t>& starts, int64_t first_expert,
                      int64_t unit_offset, uint64_t thr, at::opmath_type<scalar_t> scale) {
  const int64_t C = num_chunks(N, N * F);
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t c = 0; c < C; ++c) {
    const int64_t per = (N + C - 1) / C;
    const int64_t r0 = std::min(N, c * per), r1 = std::min(N, r0 + per);
    if (r0 < r1) {
      dropout_rows(a, hash, out, r0, r1, F, starts, first_expert, unit_offset, thr, scale);
    }
  }
}

}  // namespace

at::Tensor expert_dropout_cpu(const at::Tensor& a_in, const at::Tensor& row_hash_in,
                              const at::Tensor& group_sizes_in, int64_t first_expert,
                              int64_t unit_offset, double p) {
  check_expert_dropout_args(a_in, row_hash_in, group_sizes_in, first_expert, unit_offset, p);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor hash = row_hash_in.contiguous();
  const at::Tensor group_sizes = group_sizes_in.contiguous();
  const int64_t N = a.size(0), F = a.size(1), G = group_sizes.size(0);
  at::Tensor out = at::empty_like(a);
  if (N == 0 || F == 0) return out;
  const std::vector<int64_t> starts = group_row_starts(group_sizes.data_ptr<int64_t>(), G);
  const uint64_t thr = dropout_hash::threshold(p);
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "expert_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_all_rows(a.data_ptr<scalar_t>(), hash.data_ptr<int64_t>(),
                     out.data_ptr<scalar_t>(), N, F, starts, first_expert, unit_offset, thr,
                     static_cast<acc_t>(scale));
  });
  return out;
}

}  // namespace moe_parallel
