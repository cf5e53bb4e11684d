// Row-parallel launch helpers shared by the CUDA kernels of moe_parallel.
//
// Layout: a block of kBlockThreads threads is shaped (tpr, rows_per_block); the tpr threads
// sharing threadIdx.y cooperate on one row, striding over its vectors by tpr. tpr is a power
// of two in [1, kBlockThreads], so a group never straddles a warp unless it spans whole warps.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <cuda_runtime.h>

namespace moe_parallel::cuda_rows {

constexpr int kBlockThreads = 256;

// N elements of T loaded/stored as one access; sizeof(T) * N == 16 gives 128-bit accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct RowLaunch {
  dim3 grid;
  dim3 block;
};

// Launch shape for `rows` rows of `vecs_per_row` vectors each (rows > 0).
inline RowLaunch row_launch(int64_t rows, int64_t vecs_per_row) {
  int tpr = 1;
  while (tpr < kBlockThreads && tpr < vecs_per_row) tpr <<= 1;
  const int rows_per_block = kBlockThreads / tpr;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return {dim3(static_cast<unsigned>(blocks)), dim3(tpr, rows_per_block)};
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Largest access width in bytes (16, 8, 4 or 2) dividing row_bytes and every pointer.
inline int access_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4}) {
    bool ok = row_bytes % w == 0;
    for (const void* p : ptrs) ok = ok && is_aligned(p, w);
    if (ok) return w;
  }
  return 2;
}

// Grid-stride bound for 1-D bookkeeping kernels.
inline unsigned flat_blocks(int64_t n, int threads = kBlockThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

}  // namespace moe_parallel::cuda_rows
