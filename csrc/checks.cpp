// Argument validation shared by every backend (CPU kernels call these first; the CUDA
// kernels call the same functions). Bad values, shapes and dtypes raise ValueError
// (TORCH_CHECK_VALUE); device mismatches raise RuntimeError (TORCH_CHECK). Every message
// names the argument and what is allowed. Index range checks use ATen reductions, so
// they run on the tensor's own device (one host sync per checked tensor).
#include <algorithm>
#include <iterator>
#include <string>

#include "ops.h"

namespace moe_parallel {
namespace {

constexpr const char* kFloatDtypes = "float32, float64, bfloat16 or float16";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), name, " must have dtype ",
                    kFloatDtypes, ", got ", t.scalar_type());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", shape,
                    ", got shape ", t.sizes());
}

void check_int64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, name, " must have dtype int64, got ",
                    t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// Every entry of idx lies in [lo, hi).
void check_index_range(const at::Tensor& idx, int64_t lo, int64_t hi, const char* name,
                       const char* allowed) {
  if (idx.numel() == 0) return;
  auto [mn, mx] = at::aminmax(idx);
  const at::Tensor both = at::stack({mn, mx}).cpu();
  const int64_t vmin = both[0].item<int64_t>(), vmax = both[1].item<int64_t>();
  TORCH_CHECK_VALUE(vmin >= lo && vmax < hi, name, " entries must lie in ", allowed, " = [",
                    lo, ", ", hi, "), got values in [", vmin, ", ", vmax, "]");
}

// A host-side int64 vector argument: CPU, int64, 1-D, given length (or any when len < 0).
void check_host_index_vector(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  check_int64(t, name);
  check_dim(t, 1, name, "[n]");
  if (len >= 0) {
    TORCH_CHECK_VALUE(t.size(0) == len, name, " must have ", len, " entries, got ", t.size(0));
  }
}

// group/split sizes: entries >= 0 summing to total.
void check_sizes_sum(const at::Tensor& sizes, int64_t total, const char* name,
                     const char* total_desc) {
  const at::Tensor s = sizes.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  int64_t sum = 0;
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0, name, " entries must be >= 0, got ", p[i], " at index ", i);
    sum += p[i];
  }
  TORCH_CHECK_VALUE(sum == total, name, " must sum to ", total_desc, " (", total, "), got ",
                    sum);
}

}  // namespace

void check_permute_args(const at::Tensor& x, const at::Tensor& expert_idx, int64_t num_experts,
                        const std::optional<at::Tensor>& keep, int64_t pad_to,
                        bool validate) {
  check_dim(x, 2, "x", "[T, H]");
  check_float(x, "x");
  check_dim(expert_idx, 2, "expert_idx", "[T, k]");
  check_int64(expert_idx, "expert_idx");
  check_same_device(expert_idx, "expert_idx", x, "x");
  TORCH_CHECK_VALUE(expert_idx.size(0) == x.size(0), "expert_idx must have x.size(0) = ",
                    x.size(0), " rows, got ", expert_idx.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(pad_to >= 0, "pad_to must be >= 0 (0 = no padding), got ", pad_to);
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(keep->scalar_type() == at::kBool, "keep must have dtype bool, got ",
                      keep->scalar_type());
    TORCH_CHECK_VALUE(keep->sizes() == expert_idx.sizes(),
                      "keep must have the shape of expert_idx ", expert_idx.sizes(), ", got ",
                      keep->sizes());
    check_same_device(*keep, "keep", x, "x");
  }
  if (validate) check_index_range(expert_idx, 0, num_experts, "expert_idx", "[0, num_experts)");
  if (validate && pad_to > 0 && expert_idx.numel() > 0) {
    // Kept assignments per expert (dropped ones go to the extra bin num_experts).
    at::Tensor ids = expert_idx.reshape({-1});
    if (keep.has_value()) {
      ids = at::where(keep->reshape({-1}), ids, at::scalar_tensor(num_experts, ids.options()));
    }
    const at::Tensor counts = at::bincount(ids, {}, num_experts + 1).narrow(0, 0, num_experts);
    const int64_t largest = counts.max().item<int64_t>();
    TORCH_CHECK_VALUE(largest <= pad_to, "pad_to (", pad_to,
                      ") is smaller than the kept assignments of expert ",
                      counts.argmax().item<int64_t>(), " (", largest,
                      "); pad_to must be 0 or >= the largest per-expert count");
  }
}

void check_unpermute_args(const at::Tensor& y, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& probs, int64_t num_tokens,
                          bool validate) {
  check_dim(y, 2, "y", "[N, H]");
  check_float(y, "y");
  check_dim(row_map, 2, "row_map", "[T, k]");
  check_int64(row_map, "row_map");
  check_same_device(row_map, "row_map", y, "y");
  TORCH_CHECK_VALUE(num_tokens == row_map.size(0), "num_tokens must equal row_map.size(0) = ",
                    row_map.size(0), ", got ", num_tokens);
  if (probs.has_value()) {
    check_float(*probs, "probs");
    TORCH_CHECK_VALUE(probs->sizes() == row_map.sizes(),
                      "probs must have the shape of row_map ", row_map.sizes(), ", got ",
                      probs->sizes());
    check_same_device(*probs, "probs", y, "y");
  }
  if (validate) check_index_range(row_map, -1, y.size(0), "row_map", "[-1, y.size(0))");
}

void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& y,
                                   const at::Tensor& row_map,
                                   const std::optional<at::Tensor>& probs, int64_t num_rows,
                                   bool validate) {
  check_dim(y, 2, "y", "[N, H]");
  check_float(y, "y");
  TORCH_CHECK_VALUE(num_rows == y.size(0), "num_rows must equal y.size(0) = ", y.size(0),
                    ", got ", num_rows);
  check_dim(row_map, 2, "row_map", "[T, k]");
  check_int64(row_map, "row_map");
  check_same_device(row_map, "row_map", y, "y");
  check_dim(grad_out, 2, "grad_out", "[T, H]");
  TORCH_CHECK_VALUE(grad_out.scalar_type() == y.scalar_type(),
                    "grad_out must have the dtype of y (", y.scalar_type(), "), got ",
                    grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.size(0) == row_map.size(0) && grad_out.size(1) == y.size(1),
                    "grad_out must have shape [row_map.size(0), y.size(1)] = [",
                    row_map.size(0), ", ", y.size(1), "], got ", grad_out.sizes());
  check_same_device(grad_out, "grad_out", y, "y");
  if (probs.has_value()) {
    check_float(*probs, "probs");
    TORCH_CHECK_VALUE(probs->sizes() == row_map.sizes(),
                      "probs must have the shape of row_map ", row_map.sizes(), ", got ",
                      probs->sizes());
    check_same_device(*probs, "probs", y, "y");
  }
  if (validate) check_index_range(row_map, -1, num_rows, "row_map", "[-1, num_rows)");
}

void check_sort_chunks_args(const at::Tensor& x, const at::Tensor& split_sizes,
                            const at::Tensor& order) {
  check_dim(x, 2, "x", "[N, H]");
  check_float(x, "x");
  check_host_index_vector(split_sizes, "split_sizes", -1);
  check_host_index_vector(order, "order", split_sizes.size(0));
  check_sizes_sum(split_sizes, x.size(0), "split_sizes", "x.size(0)");
  // order is a permutation of 0..n-1.
  const int64_t n = order.size(0);
  const at::Tensor o = order.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < n && !seen[p[i]],
                      "order must be a permutation of 0..", n - 1, ", got ", p[i],
                      " at index ", i, (p[i] >= 0 && p[i] < n ? " (repeated)" : " (out of range)"));
    seen[p[i]] = 1;
  }
}

void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b) {
  check_dim(a, 2, "a", "[M, K]");
  check_float(a, "a");
  check_dim(b, 3, "b", trans_b ? "[G, N, K] (trans_b=True)" : "[G, K, N] (trans_b=False)");
  TORCH_CHECK_VALUE(b.scalar_type() == a.scalar_type(), "b must have the dtype of a (",
                    a.scalar_type(), "), got ", b.scalar_type());
  check_same_device(b, "b", a, "a");
  const int64_t k_of_b = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK_VALUE(k_of_b == a.size(1), "b must have shape ",
                    trans_b ? "[G, N, K]" : "[G, K, N]", " with K = a.size(1) = ", a.size(1),
                    " (trans_b=", trans_b ? "True" : "False", "), got ", b.sizes());
  check_host_index_vector(group_sizes, "group_sizes", b.size(0));
  check_sizes_sum(group_sizes, a.size(0), "group_sizes", "a.size(0)");
}

void check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes) {
  check_dim(a, 2, "a", "[M, K]");
  check_float(a, "a");
  check_dim(grad_out, 2, "grad_out", "[M, N]");
  TORCH_CHECK_VALUE(grad_out.scalar_type() == a.scalar_type(),
                    "grad_out must have the dtype of a (", a.scalar_type(), "), got ",
                    grad_out.scalar_type());
  check_same_device(grad_out, "grad_out", a, "a");
  TORCH_CHECK_VALUE(grad_out.size(0) == a.size(0), "grad_out must have a.size(0) = ",
                    a.size(0), " rows, got ", grad_out.size(0));
  check_host_index_vector(group_sizes, "group_sizes", -1);
  check_sizes_sum(group_sizes, a.size(0), "group_sizes", "a.size(0)");
}

void check_grouped_gemm_backend(c10::string_view backend, const at::Tensor& a) {
  static constexpr const char* kBackends[] = {"auto",   "loop",  "streams",
                                              "cublas", "torch", "cutlass"};
  if (std::none_of(std::begin(kBackends), std::end(kBackends),
                   [&](const char* name) { return backend == name; })) {
    std::string allowed;
    for (const char* name : kBackends) {
      allowed += (allowed.empty() ? "'" : ", '") + std::string(name) + "'";
    }
    TORCH_CHECK_VALUE(false, "backend must be one of ", allowed, ", got '", backend, "'");
  }
  TORCH_CHECK_VALUE(a.is_cuda() || backend == "auto" || backend == "loop", "backend='",
                    backend, "' runs on CUDA tensors only; on ", a.device(),
                    " use 'auto' or 'loop'");
}

void check_swiglu_args(const at::Tensor& h) {
  check_dim(h, 2, "h", "[N, 2F]");
  check_float(h, "h");
  TORCH_CHECK_VALUE(h.size(1) % 2 == 0, "h must have an even number of columns [N, 2F] "
                    "(gate | up), got shape ", h.sizes());
}

void check_expert_dropout_args(const at::Tensor& a, const at::Tensor& row_hash,
                               const at::Tensor& group_sizes, int64_t first_expert,
                               int64_t unit_offset, double p) {
  check_dim(a, 2, "a", "[N, F]");
  check_float(a, "a");
  check_int64(row_hash, "row_hash");
  check_dim(row_hash, 1, "row_hash", "[N]");
  check_same_device(row_hash, "row_hash", a, "a");
  TORCH_CHECK_VALUE(row_hash.size(0) == a.size(0), "row_hash must have a.size(0) = ", a.size(0),
                    " entries (one per row), got ", row_hash.size(0));
  check_host_index_vector(group_sizes, "group_sizes", -1);
  const int64_t G = group_sizes.size(0);
  TORCH_CHECK_VALUE(first_expert >= 0 && first_expert + G <= (int64_t(1) << 32),
                    "first_expert must be >= 0 with first_expert + G <= 2^32 (G = ", G,
                    " groups), got ", first_expert);
  TORCH_CHECK_VALUE(unit_offset >= 0 && unit_offset + a.size(1) <= (int64_t(1) << 32),
                    "unit_offset must be >= 0 with unit_offset + F <= 2^32 (F = ", a.size(1),
                    " columns), got ", unit_offset);
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "p must be a number in [0, 1), got ", p);
  check_sizes_sum(group_sizes, a.size(0), "group_sizes", "a.size(0)");
}

void check_swiglu_backward_args(const at::Tensor& grad_out, const at::Tensor& h) {
  check_swiglu_args(h);
  check_dim(grad_out, 2, "grad_out", "[N, F]");
  TORCH_CHECK_VALUE(grad_out.scalar_type() == h.scalar_type(),
                    "grad_out must have the dtype of h (", h.scalar_type(), "), got ",
                    grad_out.scalar_type());
  check_same_device(grad_out, "grad_out", h, "h");
  TORCH_CHECK_VALUE(grad_out.size(0) == h.size(0) && 2 * grad_out.size(1) == h.size(1),
                    "grad_out must have shape [N, F] = [", h.size(0), ", ", h.size(1) / 2,
                    "] for h ", h.sizes(), ", got ", grad_out.sizes());
}

}  // namespace moe_parallel
