// Grouped GEMM over consecutive row groups of a (group g = the next group_sizes[g] rows):
//   grouped_gemm:       out_g = a_g @ b[g]            (b [G,K,N])
//                       out_g = a_g @ b[g]^T          (b [G,N,K], trans_b)
//   grouped_gemm_wgrad: grad_b[g] = a_g^T @ grad_out_g        ([G,K,N])
//                       grad_b[g] = grad_out_g^T @ a_g        ([G,N,K], trans_b)
//                       zero for empty groups.
// One at::mm_out per group into a view of the output: BLAS on CPU, cuBLAS on CUDA (backend
// "loop"; csrc/cuda/grouped_gemm_cuda.cpp has the other CUDA backends). On CPU many
// small groups run side by side on the OpenMP threads (for_each_group).
#include <algorithm>
#include <exception>
#include <numeric>
#include <vector>

#include "parallel.h"
#include "../ops.h"

#include <ATen/ThreadLocalState.h>

namespace moe_parallel {

namespace {

// Groups' GEMMs side by side on the OpenMP threads (each BLAS call then runs on one thread)
// rather than one after another with a multi-threaded BLAS call each: on CPU, when there are
// at least 2 groups per thread and the mean group GEMM is under kSideBySideFlops. Small GEMMs
// split over threads waste time in the split; many of them keep the threads busy whole.
// Measured on 2 cores, fp32 forward+backward of the expert FFN: 64 groups of 384 rows
// (H=1024, 2F=512): 10% faster side by side; 8 groups of 1024 rows (H=1024, 2F=4096): 3% slower.
constexpr double kSideBySideFlops = 1e9;

// Calls one(g, row) for every group g, row = its first row (the sum of the sizes before it):
// side by side largest first (dynamic schedule), or in order. A worker's first exception is
// rethrown after the loop.
template <typename Fn>
void for_each_group(const at::Tensor& a, const int64_t* gs, int64_t G, int64_t k_times_n,
                    const Fn& one) {
  const std::vector<int64_t> row = group_row_starts(gs, G);
  const int64_t threads = max_threads();
  const double mean_flops =
      2.0 * static_cast<double>(a.size(0)) * k_times_n / std::max<int64_t>(G, 1);
  if (!a.is_cpu() || threads < 2 || G < 2 * threads || mean_flops >= kSideBySideFlops) {
    for (int64_t g = 0; g < G; ++g) one(g, row[g]);
    return;
  }
  const std::vector<int64_t> order = groups_largest_first(gs, G);
  const at::ThreadLocalState tls;  // grad mode and dispatch keys of the caller, for each thread
  std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < G; ++i) {
    at::ThreadLocalStateGuard guard(tls);
    try {
      one(order[i], row[order[i]]);
    } catch (...) {
#pragma omp critical(moe_parallel_grouped_gemm_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace

std::vector<int64_t> group_row_starts(const int64_t* gs, int64_t G) {
  std::vector<int64_t> row(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) row[g + 1] = row[g] + gs[g];
  return row;
}

std::vector<int64_t> groups_largest_first(const int64_t* gs, int64_t G) {
  std::vector<int64_t> order(G);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return gs[x] > gs[y]; });
  return order;
}

void gemm_one_group(const at::Tensor& a, const at::Tensor& b, int64_t g, int64_t row, int64_t m,
                    bool trans_b, at::Tensor& out) {
  at::Tensor dst = out.narrow(0, row, m);
  at::mm_out(dst, a.narrow(0, row, m), trans_b ? b.select(0, g).t() : b.select(0, g));
}

void wgrad_one_group(const at::Tensor& a, const at::Tensor& grad_out, int64_t g, int64_t row,
                     int64_t m, bool trans_b, at::Tensor& grad_b) {
  at::Tensor dst = grad_b.select(0, g);
  const at::Tensor a_g = a.narrow(0, row, m);
  const at::Tensor go_g = grad_out.narrow(0, row, m);
  if (trans_b) {
    at::mm_out(dst, go_g.t(), a_g);
  } else {
    at::mm_out(dst, a_g.t(), go_g);
  }
}

at::Tensor grouped_gemm_loop(const at::Tensor& a, const at::Tensor& b, const int64_t* gs,
                             bool trans_b) {
  const int64_t G = b.size(0), N = trans_b ? b.size(1) : b.size(2);
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  auto one = [&](int64_t g, int64_t row) {
    if (gs[g] > 0) gemm_one_group(a, b, g, row, gs[g], trans_b, out);
  };
  for_each_group(a, gs, G, a.size(1) * N, one);
  return out;
}

at::Tensor grouped_gemm_wgrad_loop(const at::Tensor& a, const at::Tensor& grad_out,
                                   const int64_t* gs, int64_t G, bool trans_b) {
  const int64_t K = a.size(1), N = grad_out.size(1);
  at::Tensor grad_b = trans_b ? at::empty({G, N, K}, a.options()) : at::empty({G, K, N}, a.options());
  auto one = [&](int64_t g, int64_t row) {
    if (gs[g] == 0) {
      grad_b.select(0, g).zero_();
    } else {
      wgrad_one_group(a, grad_out, g, row, gs[g], trans_b, grad_b);
    }
  };
  for_each_group(a, gs, G, K * N, one);
  return grad_b;
}

at::Tensor grouped_gemm_impl(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b,
                             c10::string_view backend) {
  check_grouped_gemm_args(a, b, group_sizes, trans_b);
  check_grouped_gemm_backend(backend, a);
  const at::Tensor sizes = group_sizes.contiguous();
  return grouped_gemm_loop(a, b, sizes.data_ptr<int64_t>(), trans_b);
}

at::Tensor grouped_gemm_wgrad_impl(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes, bool trans_b,
                                   c10::string_view backend) {
  check_grouped_gemm_wgrad_args(a, grad_out, group_sizes);
  check_grouped_gemm_backend(backend, a);
  const at::Tensor sizes = group_sizes.contiguous();
  return grouped_gemm_wgrad_loop(a, grad_out, sizes.data_ptr<int64_t>(), sizes.size(0), trans_b);
}

}  // namespace moe_parallel
