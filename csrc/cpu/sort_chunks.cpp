// sort_chunks: x split along dim 0 into chunks of split_sizes rows, reassembled as
//   out = cat([chunk[order[0]], chunk[order[1]], ...]).
// CPU: the chunks are cut into blocks of rows, copied with memcpy by an OpenMP loop.
// Other devices: one at::cat of narrowed views (a single batched copy on CUDA).
#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "../ops.h"

namespace moe_parallel {
namespace {

// Rows [src, src + rows) of x go to rows [dst, dst + rows) of out.
struct RowBlock {
  int64_t src, dst, rows;
};

constexpr int64_t kBlockBytes = 1 << 16;

at::Tensor sort_chunks_cpu(const at::Tensor& x_in, const int64_t* sizes, const int64_t* order,
                           int64_t n) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  if (x.numel() == 0) return out;

  std::vector<int64_t> src_start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) src_start[i + 1] = src_start[i] + sizes[i];
  const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / row_bytes);
  std::vector<RowBlock> blocks;
  int64_t dst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = order[i];
    for (int64_t r = 0; r < sizes[c]; r += block_rows) {
      const int64_t rows = std::min(block_rows, sizes[c] - r);
      blocks.push_back({src_start[c] + r, dst + r, rows});
    }
    dst += sizes[c];
  }

  const char* src_ptr = static_cast<const char*>(x.data_ptr());
  char* dst_ptr = static_cast<char*>(out.data_ptr());
  const int64_t B = static_cast<int64_t>(blocks.size());
  const int64_t C = num_chunks(B, x.numel());
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t b = 0; b < B; ++b) {
    const RowBlock& blk = blocks[b];
    std::memcpy(dst_ptr + blk.dst * row_bytes, src_ptr + blk.src * row_bytes,
                blk.rows * row_bytes);
  }
  return out;
}

at::Tensor sort_chunks_generic(const at::Tensor& x, const int64_t* sizes, const int64_t* order,
                               int64_t n) {
  std::vector<int64_t> src_start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) src_start[i + 1] = src_start[i] + sizes[i];
  std::vector<at::Tensor> pieces;
  pieces.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = order[i];
    if (sizes[c] > 0) pieces.push_back(x.narrow(0, src_start[c], sizes[c]));
  }
  if (pieces.empty()) return at::empty_like(x, at::MemoryFormat::Contiguous);
  return at::cat(pieces, 0);
}

}  // namespace

at::Tensor sort_chunks_impl(const at::Tensor& x, const at::Tensor& split_sizes,
                            const at::Tensor& order) {
  check_sort_chunks_args(x, split_sizes, order);
  const at::Tensor sizes = split_sizes.contiguous();
  const at::Tensor ord = order.contiguous();
  const int64_t n = sizes.numel();
  if (x.device().is_cpu()) {
    return sort_chunks_cpu(x, sizes.data_ptr<int64_t>(), ord.data_ptr<int64_t>(), n);
  }
  return sort_chunks_generic(x, sizes.data_ptr<int64_t>(), ord.data_ptr<int64_t>(), n);
}

}  // namespace moe_parallel
