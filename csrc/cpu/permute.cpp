// permute (CPU): gather token rows into expert-major order.
//   Kept assignments (t, j) are ordered by (expert_idx[t,j], t, j). Expert e's segment
//   starts at sum_{e'<e} seg(e'), seg = pad_to if pad_to > 0 else count(e); padding rows are
//   zero. row_map[t,j] = destination row, or -1 when keep[t,j] is false.
// Three passes over contiguous token chunks: per-chunk expert counts, prefix sums over
// (expert, chunk), then each chunk assigns rows in (t, j) order and copies x[t] there.
// The result does not depend on the chunking, so it is deterministic.
#include <cstring>
#include <vector>

#include "../ops.h"
#include "parallel.h"

namespace moe_parallel {

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(
    const at::Tensor& x_in, const at::Tensor& expert_idx, int64_t num_experts,
    const std::optional<at::Tensor>& keep_in, int64_t pad_to, bool validate) {
  check_permute_args(x_in, expert_idx, num_experts, keep_in, pad_to, validate);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  const at::Tensor keep = keep_in.has_value() ? keep_in->contiguous() : at::Tensor();
  const int64_t T = x.size(0), H = x.size(1), k = idx.size(1), E = num_experts;
  const int64_t row_bytes = H * static_cast<int64_t>(x.element_size());
  const int64_t* ids = idx.data_ptr<int64_t>();
  const bool* kept = keep.defined() ? keep.data_ptr<bool>() : nullptr;

  const int64_t C = num_chunks(T, T * std::max<int64_t>(k, 1) * std::max<int64_t>(H, 1));
  const int64_t per_chunk = (T + C - 1) / C;

  // Pass 1: counts[c * E + e] = kept assignments of expert e among chunk c's tokens.
  std::vector<int64_t> counts(C * E, 0);
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t c = 0; c < C; ++c) {
    int64_t* cnt = counts.data() + c * E;
    const int64_t end = std::min(T, (c + 1) * per_chunk);
    for (int64_t i = c * per_chunk * k; i < end * k; ++i) {
      if (!kept || kept[i]) ++cnt[ids[i]];
    }
  }

  // Pass 2: tokens_per_expert, segment starts, and each chunk's first row per expert.
  at::Tensor tokens_per_expert = at::empty({E}, idx.options());
  int64_t* tpe = tokens_per_expert.data_ptr<int64_t>();
  std::vector<int64_t> seg_start(E), next_row(C * E);
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t c = 0; c < C; ++c) {
      next_row[c * E + e] = total + n;
      n += counts[c * E + e];
    }
    tpe[e] = n;
    TORCH_CHECK_VALUE(pad_to == 0 || n <= pad_to, "pad_to (", pad_to,
                      ") is smaller than the kept assignments of expert ", e, " (", n, ")");
    seg_start[e] = total;
    total += pad_to > 0 ? pad_to : n;
  }

  // Pass 3: assign rows in (t, j) order within each chunk and copy the token rows.
  at::Tensor permuted = at::empty({total, H}, x.options());
  at::Tensor row_map = at::empty({T, k}, idx.options());
  int64_t* rmap = row_map.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(permuted.data_ptr());
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t c = 0; c < C; ++c) {
    int64_t* next = next_row.data() + c * E;
    const int64_t end = std::min(T, (c + 1) * per_chunk);
    for (int64_t t = c * per_chunk; t < end; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = t * k + j;
        if (kept && !kept[i]) {
          rmap[i] = -1;
          continue;
        }
        const int64_t row = next[ids[i]]++;
        rmap[i] = row;
        if (row_bytes > 0) std::memcpy(dst + row * row_bytes, src + t * row_bytes, row_bytes);
      }
    }
  }

  // Padding rows [seg_start + count, seg_start + pad_to) of each expert are zero.
  if (pad_to > 0 && row_bytes > 0) {
    const int64_t CE = num_chunks(E, total * H);
#pragma omp parallel for schedule(static) num_threads(CE) if (CE > 1)
    for (int64_t e = 0; e < E; ++e) {
      std::memset(dst + (seg_start[e] + tpe[e]) * row_bytes, 0, (pad_to - tpe[e]) * row_bytes);
    }
  }
  return {permuted, row_map, tokens_per_expert};
}

}  // namespace moe_parallel
