// Declarations shared by the op registry and the CPU/CUDA kernels of moe_parallel._C.
// Where a kernel lives: csrc/cpu/ every CPU kernel (one file per op family; those written with
// ATen calls only are "device-generic" and csrc/cuda/register_cuda.cpp registers them for CUDA
// too), csrc/cuda/ every CUDA-only kernel (named after its CPU twin), and at the top this
// header, the op schemas (registry.cpp), the shared argument checks (checks.cpp) and the
// Python module stub (module.cpp).
//
// Index conventions (all index tensors are int64):
//   expert_idx [T, k]  global expert id of assignment (t, j), in [0, num_experts).
//   keep       [T, k]  bool, optional: false marks an assignment dropped by capacity.
//   row_map    [T, k]  row of assignment (t, j) in the permuted buffer, -1 when dropped.
//   tokens_per_expert [E] kept assignments per expert (real rows, padding excluded).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>
#include <vector>

namespace moe_parallel {

// ---- CPU kernels (csrc/cpu) ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(
    const at::Tensor& x, const at::Tensor& expert_idx, int64_t num_experts,
    const std::optional<at::Tensor>& keep, int64_t pad_to, bool validate);
at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& row_map,
                         const std::optional<at::Tensor>& probs, int64_t num_tokens,
                         bool validate);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_map,
    const std::optional<at::Tensor>& probs, int64_t num_rows, bool validate);
// SwiGLU of h [N, 2F] = [gate | up]: out [N, F] = silu(gate) * up, and its backward.
at::Tensor swiglu_cpu(const at::Tensor& h);
at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h);
at::Tensor clamped_swiglu_cpu(const at::Tensor& h, double alpha, double limit);
at::Tensor clamped_swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h,
                                       double alpha, double limit);
// Expert dropout (csrc/cpu/dropout.cpp; hash in csrc/dropout_hash.h): a [N, F] grouped by local
// expert, out = a * keep / (1 - p), keep a function of (row_hash[r] mod 2^32, first_expert + g,
// unit_offset + j) only.
at::Tensor expert_dropout_cpu(const at::Tensor& a, const at::Tensor& row_hash,
                              const at::Tensor& group_sizes, int64_t first_expert,
                              int64_t unit_offset, double p);

// ---- device-generic (csrc/cpu/sort_chunks.cpp, csrc/cpu/grouped_gemm.cpp): CPU path with
// OpenMP, other devices through ATen copies/GEMMs ----
at::Tensor sort_chunks_impl(const at::Tensor& x, const at::Tensor& split_sizes,
                            const at::Tensor& order);
// Per-group at::mm into views of the output (BLAS on CPU, cuBLAS on CUDA): backend "loop"
// (and "auto" on CPU). The other backends are CUDA only (grouped_gemm_cuda). The _impl
// functions check their arguments, the _loop ones (gs: G host sizes) do not.
at::Tensor grouped_gemm_impl(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b,
                             c10::string_view backend);
at::Tensor grouped_gemm_wgrad_impl(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes, bool trans_b,
                                   c10::string_view backend);
at::Tensor grouped_gemm_loop(const at::Tensor& a, const at::Tensor& b, const int64_t* gs,
                             bool trans_b);
at::Tensor grouped_gemm_wgrad_loop(const at::Tensor& a, const at::Tensor& grad_out,
                                   const int64_t* gs, int64_t G, bool trans_b);
// First row of every group (G + 1 entries, the last = the total), and the groups by decreasing
// size (ties in index order).
std::vector<int64_t> group_row_starts(const int64_t* gs, int64_t G);
std::vector<int64_t> groups_largest_first(const int64_t* gs, int64_t G);
// One group g of rows [row, row + m) (m > 0) of those: out rows = a rows @ b[g] (b[g]^T), and
// grad_b[g] = a rows^T @ grad_out rows (grad_out rows^T @ a rows with trans_b).
void gemm_one_group(const at::Tensor& a, const at::Tensor& b, int64_t g, int64_t row, int64_t m,
                    bool trans_b, at::Tensor& out);
void wgrad_one_group(const at::Tensor& a, const at::Tensor& grad_out, int64_t g, int64_t row,
                     int64_t m, bool trans_b, at::Tensor& grad_b);

// ---- argument checks (csrc/checks.cpp), shared by every backend; they raise
// ValueError/RuntimeError naming the argument, before any kernel runs. validate=false skips
// the data-dependent checks (index ranges, permute's per-expert count bound; each a
// device-to-host read on CUDA) for indices the caller has checked or built in range: ids that
// passed ops.expert_counts, a row map returned by permute ----
void check_permute_args(const at::Tensor& x, const at::Tensor& expert_idx, int64_t num_experts,
                        const std::optional<at::Tensor>& keep, int64_t pad_to, bool validate);
void check_unpermute_args(const at::Tensor& y, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& probs, int64_t num_tokens,
                          bool validate);
void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& y,
                                   const at::Tensor& row_map,
                                   const std::optional<at::Tensor>& probs, int64_t num_rows,
                                   bool validate);
// sort_chunks: split_sizes/order CPU int64 [n], sizes >= 0 summing to x.size(0), order a
// permutation of 0..n-1.
void check_sort_chunks_args(const at::Tensor& x, const at::Tensor& split_sizes,
                            const at::Tensor& order);
// grouped_gemm: b [G,K,N] (or [G,N,K] with trans_b) of a's dtype/device; group_sizes CPU int64
// [G], entries >= 0 summing to a.size(0).
void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b);
void check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes);
// Grouped GEMM backend: one of "auto", "loop" (every device), "streams", "cublas", "torch",
// "cutlass" (CUDA only).
void check_grouped_gemm_backend(c10::string_view backend, const at::Tensor& a);
// swiglu: h 2-D float with an even width; backward: grad_out [N, F] of h's dtype/device.
void check_swiglu_args(const at::Tensor& h);
void check_swiglu_backward_args(const at::Tensor& grad_out, const at::Tensor& h);
// expert_dropout: a 2-D float; row_hash int64 [a.size(0)] on a's device; group_sizes CPU int64
// [G] summing to a.size(0); first_expert >= 0 with first_expert + G <= 2^32; unit_offset >= 0
// with unit_offset + a.size(1) <= 2^32; 0 <= p < 1.
void check_expert_dropout_args(const at::Tensor& a, const at::Tensor& row_hash,
                               const at::Tensor& group_sizes, int64_t first_expert,
                               int64_t unit_offset, double p);

// ---- block-sparse (dropless) expert products, device-generic (csrc/cpu/block_sparse.cpp) ----
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
block_topology_impl(const at::Tensor& tokens_per_expert, int64_t block_size,
                    int64_t n_col_blocks);
at::Tensor bsr_sdd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& block_row,
                        const at::Tensor& block_col, int64_t block_size);
at::Tensor bsr_dsd_impl(const at::Tensor& blocks, const at::Tensor& w, const at::Tensor& row_ptr,
                        const at::Tensor& block_col, int64_t num_rows);
at::Tensor bsr_wgrad_impl(const at::Tensor& x, const at::Tensor& blocks,
                          const at::Tensor& block_row, const at::Tensor& col_ptr,
                          const at::Tensor& transpose_idx, int64_t num_experts, bool trans);

#ifdef MOE_PARALLEL_WITH_CUDA
// ---- CUDA kernels (csrc/cuda) ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(
    const at::Tensor& x, const at::Tensor& expert_idx, int64_t num_experts,
    const std::optional<at::Tensor>& keep, int64_t pad_to, bool validate);
at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& probs, int64_t num_tokens,
                          bool validate);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_map,
    const std::optional<at::Tensor>& probs, int64_t num_rows, bool validate);
at::Tensor swiglu_cuda(const at::Tensor& h);
at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& h);
at::Tensor clamped_swiglu_cuda(const at::Tensor& h, double alpha, double limit);
at::Tensor clamped_swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& h,
                                        double alpha, double limit);
at::Tensor expert_dropout_cuda(const at::Tensor& a, const at::Tensor& row_hash,
                               const at::Tensor& group_sizes, int64_t first_expert,
                               int64_t unit_offset, double p);
// Grouped GEMM on CUDA by backend (csrc/cuda/grouped_gemm_cuda.cpp): "loop" = one cuBLAS GEMM
// per group on the current stream ("auto": see auto_backend() there), "streams" = the same spread
// over side streams, "cublas" = one cublasGemmGroupedBatchedEx, "torch" = at::_grouped_mm,
// "cutlass" = a CUTLASS grouped GEMM kernel (Hopper: csrc/cuda/grouped_gemm_sm90.cu, else
// csrc/cuda/grouped_gemm_cutlass.cu).
at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b,
                             c10::string_view backend);
at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes, bool trans_b,
                                   c10::string_view backend);
// One row-major product C [m, n] = op(A) [m, k] @ op(B) [k, n]: A stored [m, k] (or [k, m] when
// trans_a) with row stride lda, likewise B; C with row stride ldc. Pointers are to elements.
struct RowMajorGemm {
  const void* a;
  int64_t lda;
  bool trans_a;
  const void* b;
  int64_t ldb;
  bool trans_b;
  void* c;
  int64_t ldc;
  int64_t m, n, k;
};
// The products of the non-empty groups (contiguous operands, gs: G host sizes):
//   grouped_products: out_g = a_g @ b[g] (a_g @ b[g]^T with trans_b);
//   wgrad_products:   grad_b[g] = a_g^T @ grad_out_g (grad_out_g^T @ a_g with trans_b).
std::vector<RowMajorGemm> grouped_products(const at::Tensor& a, const at::Tensor& b,
                                           const int64_t* gs, bool trans_b, at::Tensor& out);
std::vector<RowMajorGemm> wgrad_products(const at::Tensor& a, const at::Tensor& grad_out,
                                         const int64_t* gs, bool trans_b, at::Tensor& grad_b);
void grouped_gemm_cutlass(const at::Tensor& a, const at::Tensor& b, const int64_t* group_sizes,
                          bool trans_b, at::Tensor& out);
// Leaves the slices of empty groups untouched (the caller zeroes them).
void grouped_gemm_wgrad_cutlass(const at::Tensor& a, const at::Tensor& grad_out,
                                const int64_t* group_sizes, bool trans_b, at::Tensor& grad_b);
// The Hopper kernels of backend "cutlass" (csrc/cuda/grouped_gemm_sm90.cu): whether they run
// on `device` (sm_90 and an sm_90a build), and one launch over `problems` (bf16, one layout,
// k > 0).
bool sm90_grouped_gemm_runs_on(const at::Device& device);
void grouped_gemm_sm90(const std::vector<RowMajorGemm>& problems, const at::Device& device);
#endif

}  // namespace moe_parallel
