// Block-sparse (MegaBlocks-style, dropless) expert products. Expert weights keep the stacked
// layout w [E, K, N]; each expert's rows are padded to a multiple of the block size B.
//
//   block_topology(tokens_per_expert [E], B, n_col_blocks)
//       -> padded_offsets [E+1], block_row [nnz], block_col [nnz], row_ptr [R+1],
//          col_ptr [E*n_col_blocks+1], transpose_idx [nnz]     (all CPU int64)
//       p_e = ceil(c_e / B) * B rows per expert; R = sum p_e / B row blocks; every row block of
//       expert e holds the column blocks e*n_col_blocks .. (e+1)*n_col_blocks-1 (row-major
//       order, CSR row_ptr); col_ptr/transpose_idx list the same blocks column-major (CSC):
//       transpose_idx[k] is the row-major index of the k-th block in column order.
//   bsr_sdd(x [M_pad, K], w [E, K, N], block_row, block_col, B) -> blocks [nnz, B, B]
//       blocks[i] = x[rows r_i] @ w[e_i][:, cols j_i]   (c = block_col[i], e = c / (N/B),
//       j = c % (N/B)).
//   bsr_dsd(blocks [nnz, B, B], w [E, N, K'], row_ptr [R+1], block_col, num_rows) -> y
//       y[rows r] = sum_{i in row r} blocks[i] @ w[e_i][rows j_i, :]   (y [num_rows, K']).
//   bsr_wgrad(x [M_pad, K], blocks, block_row, col_ptr, transpose_idx, num_experts, trans)
//       trans=False: out [E, K, N], out[e][:, cols j] = sum_{i in column c} x[rows_i]^T @ blocks[i]
//       trans=True:  out [E, N, K], out[e][rows j, :] = sum_{i in column c} blocks[i]^T @ x[rows_i]
//       (columns without blocks are zero). Weight gradients of sdd (trans=False) and dsd (True).
// The products run panel by panel (see Panel below): each expert's run of row blocks and
// column blocks is one dense GEMM (at::mm, threaded by ATen's BLAS) plus a layout copy between
// the [P*B, m*B] panel and its [P, m, B, B] blocks, so the GEMM size follows the expert's load
// and the block size only sets the padding. Every sum runs in a fixed order (no atomics):
// results are bitwise deterministic. bfloat16 and float16 inputs are computed in float32 and
// rounded once at the end. The code is device generic (at::mm and copies on views): registered
// for CPU in csrc/registry.cpp and for CUDA in csrc/cuda/register_cuda.cpp (the topology
// tensors stay on the host there).
#include <algorithm>
#include <limits>
#include <vector>

#include "../ops.h"

namespace moe_parallel {
namespace {

// A panel: P consecutive row blocks row0..row0+P-1, each holding the same m consecutive
// column blocks c0..c0+m-1 of one expert, stored at block indices first + p*m + q (p < P,
// q < m). Every product runs panel by panel as one dense GEMM of [P*B, K] x [K, m*B] (or its
// transposes), so the GEMM size follows the expert's load, not the block size.
struct Panel {
  int64_t first, row0, P, c0, m;
};

// Partitions the block list (block i at row br[i], column bc[i]) into maximal panels, in list
// order, each at most ~max_elems output elements. The topology of block_topology gives one
// panel per expert (split by that bound); any other list still gets a valid partition.
// On the CPU panels are capped at kPanelElems (cache-sized work items for the threads); a GPU
// gets whole panels, one GEMM per expert.
constexpr int64_t kPanelElems = int64_t{1} << 22;

int64_t panel_cap(const at::Tensor& t) {
  return t.is_cuda() ? std::numeric_limits<int64_t>::max() : kPanelElems;
}

std::vector<Panel> find_panels(const int64_t* br, const int64_t* bc, int64_t nnz, int64_t ncb,
                               int64_t B, int64_t max_elems) {
  std::vector<Panel> panels;
  for (int64_t i = 0; i < nnz;) {
    const int64_t r = br[i], c0 = bc[i], e = c0 / ncb;
    int64_t m = 1;
    while (i + m < nnz && br[i + m] == r && bc[i + m] == c0 + m && (c0 + m) / ncb == e) ++m;
    const int64_t max_p = std::max<int64_t>(1, max_elems / (m * B * B));
    const auto row_matches = [&](int64_t p) {
      const int64_t s = i + p * m;
      if (s + m > nnz) return false;
      for (int64_t q = 0; q < m; ++q) {
        if (br[s + q] != r + p || bc[s + q] != c0 + q) return false;
      }
      return true;
    };
    int64_t P = 1;
    while (P < max_p && row_matches(P)) ++P;
    panels.push_back({i, r, P, c0, m});
    i += P * m;
  }
  return panels;
}

// The panel's blocks of ``blocks [nnz, B, B]`` as a [P, m, B, B] view.
at::Tensor panel_of(const at::Tensor& blocks, const Panel& pn, int64_t B) {
  return blocks.narrow(0, pn.first, pn.P * pn.m).view({pn.P, pn.m, B, B});
}

// Which units (row blocks of y, column blocks of a weight gradient) have been written. A
// panel's units are overwritten when none was written before, accumulated otherwise (units
// not yet written are zeroed first); units never written are zeroed at the end. Panels run in
// list order, so every sum has a fixed order: results are bitwise deterministic.
class Coverage {
 public:
  explicit Coverage(int64_t n) : written_(n, 0) {}

  template <typename Zero>
  bool claim(int64_t first, int64_t count, const Zero& zero) {
    bool any = false, all = true;
    for (int64_t u = first; u < first + count; ++u) {
      any = any || written_[u];
      all = all && written_[u];
    }
    for (int64_t u = first; u < first + count; ++u) {
      if (any && !all && !written_[u]) zero(u);
      written_[u] = 1;
    }
    return !any;
  }

  template <typename Zero>
  void zero_unclaimed(const Zero& zero) const {
    for (int64_t u = 0; u < static_cast<int64_t>(written_.size()); ++u) {
      if (!written_[u]) zero(u);
    }
  }

 private:
  std::vector<char> written_;
};

void check_float_t(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                    name, " must have dtype float32, float64, bfloat16 or float16, got ", s);
}

void check_ndim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", shape,
                    ", got shape ", t.sizes());
}

void check_host_vec(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, name, " must have dtype int64, got ",
                    t.scalar_type());
  check_ndim(t, 1, name, "[n]");
  if (len >= 0) {
    TORCH_CHECK_VALUE(t.size(0) == len, name, " must have ", len, " entries, got ", t.size(0));
  }
}

void check_range(const at::Tensor& t, int64_t lo, int64_t hi, const char* name,
                 const char* allowed) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= lo && p[i] < hi, name, " entries must lie in ", allowed, " = [",
                      lo, ", ", hi, "), got ", p[i], " at index ", i);
  }
}

// CSR/CSC offsets: ptr[0] = 0, non-decreasing, ptr[n] = total.
void check_offsets(const at::Tensor& t, int64_t total, const char* name, const char* what) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  TORCH_CHECK_VALUE(n >= 1 && p[0] == 0, name, " must start with 0");
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], name, " must be non-decreasing, got ", p[i - 1],
                      " then ", p[i], " at index ", i);
  }
  TORCH_CHECK_VALUE(p[n - 1] == total, name, " must end with ", what, " (", total, "), got ",
                    p[n - 1]);
}

void check_block_size(int64_t block_size) {
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be > 0, got ", block_size);
}

at::ScalarType compute_dtype(at::ScalarType s) {
  return (s == at::kBFloat16 || s == at::kHalf) ? at::kFloat : s;
}

// Inputs as plain (detached) tensors of the compute dtype: the products below write into
// views of a fresh output, which autograd would refuse for inputs that require grad. On CUDA
// half-precision inputs stay as they are (tensor-core GEMMs accumulate in float32; whole
// panels mean the standard topology sums nothing across panels); the CPU computes in float32.
at::Tensor upcast(const at::Tensor& t) {
  return t.is_cuda() || t.scalar_type() == compute_dtype(t.scalar_type())
             ? t.detach()
             : t.detach().to(at::kFloat);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
block_topology_impl(const at::Tensor& tokens_per_expert, int64_t block_size,
                    int64_t n_col_blocks) {
  check_host_vec(tokens_per_expert, "tokens_per_expert", -1);
  check_block_size(block_size);
  TORCH_CHECK_VALUE(n_col_blocks > 0, "n_col_blocks must be > 0, got ", n_col_blocks);
  const at::Tensor tpe = tokens_per_expert.contiguous();
  const int64_t* c = tpe.data_ptr<int64_t>();
  const int64_t E = tpe.numel();
  const auto opts = tpe.options();
  at::Tensor padded_offsets = at::empty({E + 1}, opts);
  int64_t* po = padded_offsets.data_ptr<int64_t>();
  std::vector<int64_t> blocks_of(E);
  po[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(c[e] >= 0, "tokens_per_expert entries must be >= 0, got ", c[e],
                      " at index ", e);
    blocks_of[e] = (c[e] + block_size - 1) / block_size;
    po[e + 1] = po[e] + blocks_of[e] * block_size;
  }
  const int64_t R = po[E] / block_size, nnz = R * n_col_blocks, C = E * n_col_blocks;
  at::Tensor block_row = at::empty({nnz}, opts), block_col = at::empty({nnz}, opts);
  at::Tensor row_ptr = at::empty({R + 1}, opts), col_ptr = at::empty({C + 1}, opts);
  at::Tensor transpose_idx = at::empty({nnz}, opts);
  int64_t *br = block_row.data_ptr<int64_t>(), *bc = block_col.data_ptr<int64_t>();
  int64_t *rp = row_ptr.data_ptr<int64_t>(), *cp = col_ptr.data_ptr<int64_t>();
  int64_t* ti = transpose_idx.data_ptr<int64_t>();
  // Row-major list (CSR).
  int64_t r = 0, i = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = 0; b < blocks_of[e]; ++b, ++r) {
      rp[r] = i;
      for (int64_t j = 0; j < n_col_blocks; ++j, ++i) {
        br[i] = r;
        bc[i] = e * n_col_blocks + j;
      }
    }
  }
  rp[R] = nnz;
  // Column-major list (CSC): column e*ncb + j holds expert e's row blocks in row order.
  int64_t k = 0, first_row = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < n_col_blocks; ++j) {
      cp[e * n_col_blocks + j] = k;
      for (int64_t b = 0; b < blocks_of[e]; ++b, ++k) {
        ti[k] = (first_row + b) * n_col_blocks + j;
      }
    }
    first_row += blocks_of[e];
  }
  cp[C] = nnz;
  return {padded_offsets, block_row, block_col, row_ptr, col_ptr, transpose_idx};
}

at::Tensor bsr_sdd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& block_row,
                        const at::Tensor& block_col, int64_t block_size) {
  check_block_size(block_size);
  check_ndim(x, 2, "x", "[M_pad, K]");
  check_float_t(x, "x");
  check_ndim(w, 3, "w", "[E, K, N]");
  TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type(), "w must have the dtype of x (",
                    x.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "w must be on the device of x (", x.device(), "), got ",
              w.device());
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "w must have shape [E, K, N] with K = x.size(1) = ",
                    x.size(1), ", got ", w.sizes());
  const int64_t B = block_size, E = w.size(0), N = w.size(2);
  TORCH_CHECK_VALUE(N % B == 0, "w.size(2) (N = ", N, ") must be a multiple of block_size (",
                    B, ")");
  TORCH_CHECK_VALUE(x.size(0) % B == 0, "x.size(0) (M_pad = ", x.size(0),
                    ") must be a multiple of block_size (", B, ")");
  check_host_vec(block_row, "block_row", -1);
  check_host_vec(block_col, "block_col", block_row.size(0));
  const int64_t ncb = N / B, R = x.size(0) / B, nnz = block_row.size(0);
  const at::Tensor brc = block_row.contiguous(), bcc = block_col.contiguous();
  check_range(brc, 0, R, "block_row", "[0, x.size(0) / block_size)");
  check_range(bcc, 0, E * ncb, "block_col", "[0, E * N / block_size)");
  const at::Tensor xc = upcast(x), wc = upcast(w);
  at::Tensor out = at::empty({nnz, B, B}, xc.options());
  for (const Panel& pn : find_panels(brc.data_ptr<int64_t>(), bcc.data_ptr<int64_t>(), nnz,
                                     ncb, B, panel_cap(x))) {
    const at::Tensor xp = xc.narrow(0, pn.row0 * B, pn.P * B);
    const at::Tensor wp = wc.select(0, pn.c0 / ncb).narrow(1, (pn.c0 % ncb) * B, pn.m * B);
    panel_of(out, pn, B).copy_(at::mm(xp, wp).view({pn.P, B, pn.m, B}).permute({0, 2, 1, 3}));
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor bsr_dsd_impl(const at::Tensor& blocks, const at::Tensor& w, const at::Tensor& row_ptr,
                        const at::Tensor& block_col, int64_t num_rows) {
  check_ndim(blocks, 3, "blocks", "[nnz, B, B]");
  check_float_t(blocks, "blocks");
  const int64_t B = blocks.size(1), nnz = blocks.size(0);
  TORCH_CHECK_VALUE(B > 0 && blocks.size(2) == B,
                    "blocks must have shape [nnz, B, B] with B > 0, got ", blocks.sizes());
  check_ndim(w, 3, "w", "[E, N, K]");
  TORCH_CHECK_VALUE(w.scalar_type() == blocks.scalar_type(), "w must have the dtype of blocks (",
                    blocks.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK(w.device() == blocks.device(), "w must be on the device of blocks (",
              blocks.device(), "), got ", w.device());
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  TORCH_CHECK_VALUE(N % B == 0, "w.size(1) (N = ", N, ") must be a multiple of the block size (",
                    B, ")");
  TORCH_CHECK_VALUE(num_rows >= 0 && num_rows % B == 0, "num_rows (", num_rows,
                    ") must be a non-negative multiple of the block size (", B, ")");
  const int64_t R = num_rows / B, ncb = N / B;
  check_host_vec(row_ptr, "row_ptr", R + 1);
  check_host_vec(block_col, "block_col", nnz);
  const at::Tensor rpc = row_ptr.contiguous(), bcc = block_col.contiguous();
  check_offsets(rpc, nnz, "row_ptr", "blocks.size(0)");
  check_range(bcc, 0, E * ncb, "block_col", "[0, E * N / block_size)");
  const int64_t* rp = rpc.data_ptr<int64_t>();
  std::vector<int64_t> br(nnz);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = rp[r]; i < rp[r + 1]; ++i) br[i] = r;
  }
  const at::Tensor bl = upcast(blocks), wc = upcast(w);
  at::Tensor out = at::empty({num_rows, K}, bl.options());
  // Row block r of out is written by its first panel and accumulated by later ones.
  Coverage rows(R);
  const auto zero_row = [&](int64_t r) { out.narrow(0, r * B, B).zero_(); };
  for (const Panel& pn : find_panels(br.data(), bcc.data_ptr<int64_t>(), nnz, ncb, B,
                                     panel_cap(blocks))) {
    const at::Tensor a = panel_of(bl, pn, B).permute({0, 2, 1, 3}).reshape({pn.P * B, pn.m * B});
    const at::Tensor wp = wc.select(0, pn.c0 / ncb).narrow(0, (pn.c0 % ncb) * B, pn.m * B);
    at::Tensor dst = out.narrow(0, pn.row0 * B, pn.P * B);
    if (rows.claim(pn.row0, pn.P, zero_row)) {
      at::mm_out(dst, a, wp);
    } else {
      dst.addmm_(a, wp);
    }
  }
  rows.zero_unclaimed(zero_row);
  return out.scalar_type() == blocks.scalar_type() ? out : out.to(blocks.scalar_type());
}

at::Tensor bsr_wgrad_impl(const at::Tensor& x, const at::Tensor& blocks,
                          const at::Tensor& block_row, const at::Tensor& col_ptr,
                          const at::Tensor& transpose_idx, int64_t num_experts, bool trans) {
  check_ndim(x, 2, "x", "[M_pad, K]");
  check_float_t(x, "x");
  check_ndim(blocks, 3, "blocks", "[nnz, B, B]");
  TORCH_CHECK_VALUE(blocks.scalar_type() == x.scalar_type(), "blocks must have the dtype of x (",
                    x.scalar_type(), "), got ", blocks.scalar_type());
  TORCH_CHECK(blocks.device() == x.device(), "blocks must be on the device of x (", x.device(),
              "), got ", blocks.device());
  const int64_t B = blocks.size(1), nnz = blocks.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(B > 0 && blocks.size(2) == B,
                    "blocks must have shape [nnz, B, B] with B > 0, got ", blocks.sizes());
  TORCH_CHECK_VALUE(x.size(0) % B == 0, "x.size(0) (M_pad = ", x.size(0),
                    ") must be a multiple of the block size (", B, ")");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  check_host_vec(block_row, "block_row", nnz);
  check_host_vec(col_ptr, "col_ptr", -1);
  const int64_t C = col_ptr.size(0) - 1;
  TORCH_CHECK_VALUE(C >= 1 && C % num_experts == 0, "col_ptr must have E * n_col_blocks + 1 "
                    "entries with E = num_experts = ", num_experts, ", got ", col_ptr.size(0));
  check_host_vec(transpose_idx, "transpose_idx", nnz);
  const at::Tensor brc = block_row.contiguous(), cpc = col_ptr.contiguous(),
                   tic = transpose_idx.contiguous();
  check_range(brc, 0, x.size(0) / B, "block_row", "[0, x.size(0) / block_size)");
  check_offsets(cpc, nnz, "col_ptr", "blocks.size(0)");
  check_range(tic, 0, nnz, "transpose_idx", "[0, nnz)");
  const int64_t *cp = cpc.data_ptr<int64_t>(), *ti = tic.data_ptr<int64_t>();
  // Column of every block from the CSC view; transpose_idx must be a permutation.
  std::vector<int64_t> bc(nnz, -1);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = cp[c]; k < cp[c + 1]; ++k) {
      TORCH_CHECK_VALUE(bc[ti[k]] < 0, "transpose_idx must be a permutation of [0, nnz), got ",
                        ti[k], " twice");
      bc[ti[k]] = c;
    }
  }
  const int64_t E = num_experts, ncb = C / E, N = ncb * B;
  const at::Tensor xc = upcast(x), bl = upcast(blocks);
  at::Tensor out = trans ? at::empty({E, N, K}, xc.options()) : at::empty({E, K, N}, xc.options());
  // Column block c of the weight gradient is written by its first panel, accumulated later.
  Coverage cols(C);
  const auto col_block = [&](int64_t c) {
    return trans ? out.select(0, c / ncb).narrow(0, (c % ncb) * B, B)   // [B, K]
                 : out.select(0, c / ncb).narrow(1, (c % ncb) * B, B);  // [K, B]
  };
  const auto zero_col = [&](int64_t c) { col_block(c).zero_(); };
  for (const Panel& pn : find_panels(brc.data_ptr<int64_t>(), bc.data(), nnz, ncb, B,
                                     panel_cap(x))) {
    const int64_t e = pn.c0 / ncb, j0 = pn.c0 % ncb;
    const at::Tensor xp = xc.narrow(0, pn.row0 * B, pn.P * B);  // [P*B, K]
    const at::Tensor g = panel_of(bl, pn, B).permute({0, 2, 1, 3}).reshape({pn.P * B, pn.m * B});
    at::Tensor dst = trans ? out.select(0, e).narrow(0, j0 * B, pn.m * B)   // [m*B, K]
                           : out.select(0, e).narrow(1, j0 * B, pn.m * B);  // [K, m*B]
    const at::Tensor a = trans ? g.t() : xp.t();
    const at::Tensor b = trans ? xp : g;
    if (cols.claim(pn.c0, pn.m, zero_col)) {
      at::mm_out(dst, a, b);
    } else {
      dst.addmm_(a, b);
    }
  }
  cols.zero_unclaimed(zero_col);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace moe_parallel
