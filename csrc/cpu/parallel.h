// OpenMP helpers for the CPU kernels. The extension links the same libgomp as torch, so
// torch.set_num_threads() bounds these loops too.
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace moe_parallel {

// Below this many scalar elements of work a loop runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

inline int64_t max_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// Number of contiguous chunks to split `n` items into, `work` elements in all.
inline int64_t num_chunks(int64_t n, int64_t work) {
  if (n <= 1 || work < kParallelGrain) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(max_threads(), n));
}

}  // namespace moe_parallel
