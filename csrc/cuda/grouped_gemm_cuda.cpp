// Grouped GEMM on CUDA, by backend. Contract (csrc/cpu/grouped_gemm.cpp): group g = the next
// group_sizes[g] rows,
//   grouped_gemm:       out_g = a_g @ b[g]   (b [G,K,N])    or a_g @ b[g]^T (b [G,N,K], trans_b)
//   grouped_gemm_wgrad: grad_b[g] = a_g^T @ grad_out_g ([G,K,N]) or grad_out_g^T @ a_g ([G,N,K]),
//                       zero for empty groups.
// Backends:
//   loop     one cuBLAS GEMM per non-empty group on the current stream (grouped_gemm_impl);
//   streams  the same GEMMs on kSideStreams pool streams, largest group first, joined back
//            into the current stream by events;
//   cublas   one cublasGemmGroupedBatchedEx over the non-empty groups (float32 / bfloat16 /
//            float16; TF32 for float32 only when torch allows TF32 in cuBLAS);
//   torch    at::_grouped_mm with int32 cumulative row offsets on the device (bfloat16);
//   cutlass  a CUTLASS grouped GEMM kernel (bfloat16, csrc/cuda/grouped_gemm_cutlass.cu);
//   auto     auto_backend(): the fastest measured in the layer (benchmarks/layer_bench.py).
#ifdef MOE_PARALLEL_WITH_CUDA

#include <limits>
#include <string_view>
#include <vector>

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"

namespace moe_parallel {
namespace {

// "auto": one grouped launch for bfloat16 on sm_90+ with at least kOneLaunchMinGroups groups,
// else the per-group cuBLAS loop. The one launch is at::_grouped_mm for the forward products
// and, where the CUTLASS Hopper kernels run, backend "cutlass" for the wgrad. On H100
// (benchmarks/results/h100_2026-11-23.md) the loop led the isolated 8-expert GEMMs and tied in
// the layer; with 64 experts one launch ran 13 % faster in the layer (run2: host launch cost of
// 6 x 64 GEMMs), and CUTLASS's wgrad led at::_grouped_mm's while its forward trailed (run9).
// The three one-launch choices stay within 2-5 % of each other (runs 12 and 14).
constexpr int64_t kOneLaunchMinGroups = 16;
constexpr int kSideStreams = 4;

std::string_view auto_backend(const at::Tensor& a, int64_t groups, bool wgrad) {
  const bool sm90 = at::cuda::getDeviceProperties(a.device().index())->major >= 9;
  if (a.scalar_type() != at::kBFloat16 || !sm90 || groups < kOneLaunchMinGroups) return "loop";
#ifdef MOE_PARALLEL_WITH_CUTLASS
  if (wgrad && sm90_grouped_gemm_runs_on(a.device())) return "cutlass";
#endif
  return "torch";
}

// The backend a call over `groups` groups runs ("auto" resolved), after checking the name, the
// device and that the backend takes a's dtype.
std::string_view checked_backend(c10::string_view name, const at::Tensor& a, int64_t groups,
                                 bool wgrad) {
  check_grouped_gemm_backend(name, a);
  const std::string_view backend = name == "auto" ? auto_backend(a, groups, wgrad)
                                                  : std::string_view(name.data(), name.size());
#ifndef MOE_PARALLEL_WITH_CUTLASS
  TORCH_CHECK(backend != "cutlass", "backend='cutlass' was not built (CUTLASS headers not found "
              "at build time: pip install --no-deps nvidia-cutlass, then rebuild)");
#endif
  const at::ScalarType t = a.scalar_type();
  if (backend == "torch" || backend == "cutlass") {
    TORCH_CHECK_VALUE(t == at::kBFloat16, "backend='", backend,
                      "' needs bfloat16 operands, got ", t, "; use 'loop' or 'cublas' for ",
                      t);
  } else if (backend == "cublas") {
    TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
                      "backend='cublas' needs float32, bfloat16 or float16 operands, got ", t,
                      "; use 'loop' for ", t);
  }
  return backend;
}

// Runs one(g) for every group g with group_sizes[g] > 0, round-robin over kSideStreams streams
// that start after the work already queued on the current stream; the current stream then
// waits for all of them.
template <typename Fn>
void on_side_streams(const int64_t* gs, int64_t G, const Fn& one) {
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  at::cuda::CUDAEvent ready;
  ready.record(current);
  std::vector<c10::cuda::CUDAStream> side;
  for (int s = 0; s < kSideStreams; ++s) {
    side.push_back(c10::cuda::getStreamFromPool(false, current.device_index()));
    ready.block(side.back());
  }
  int64_t i = 0;
  for (int64_t g : groups_largest_first(gs, G)) {
    if (gs[g] == 0) break;
    c10::cuda::CUDAStreamGuard guard(side[i++ % kSideStreams]);
    one(g);
  }
  for (const auto& s : side) {
    at::cuda::CUDAEvent done;
    done.record(s);
    done.block(current);
  }
}

cudaDataType_t cuda_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kHalf:
      return CUDA_R_16F;
    default:
      TORCH_CHECK_VALUE(false, "backend='cublas' does not support dtype ", t);
  }
}

int as_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int>::max(), "backend='cublas' needs ", what,
                    " < 2^31, got ", v, "; use 'loop'");
  return static_cast<int>(v);
}

// All products in one cublasGemmGroupedBatchedEx (one problem per group of the call). cuBLAS is
// column-major: the row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so
// cuBLAS's first operand is B and its second is A.
void cublas_grouped(const std::vector<RowMajorGemm>& gemms, at::ScalarType dtype,
                    const at::Device& device) {
  const int P = static_cast<int>(gemms.size());
  if (P == 0) return;
  std::vector<cublasOperation_t> op_first(P), op_second(P);
  std::vector<int> m(P), n(P), k(P), ld_first(P), ld_second(P), ldc(P), ones(P, 1);
  std::vector<float> alpha(P, 1.0f), beta(P, 0.0f);
  at::Tensor ptrs_host = at::empty({3 * static_cast<int64_t>(P)},
                                   at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* ptrs = ptrs_host.data_ptr<int64_t>();
  for (int p = 0; p < P; ++p) {
    const RowMajorGemm& g = gemms[p];
    op_first[p] = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    op_second[p] = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    m[p] = as_int(g.n, "N");
    n[p] = as_int(g.m, "the rows of a group");
    k[p] = as_int(g.k, "K");
    ld_first[p] = as_int(g.ldb, "the leading dimension");
    ld_second[p] = as_int(g.lda, "the leading dimension");
    ldc[p] = as_int(g.ldc, "the leading dimension");
    ptrs[p] = reinterpret_cast<int64_t>(g.b);
    ptrs[P + p] = reinterpret_cast<int64_t>(g.a);
    ptrs[2 * P + p] = reinterpret_cast<int64_t>(g.c);
  }
  // The caching host allocator keeps the pinned block until this copy has run.
  const at::Tensor ptrs_dev = ptrs_host.to(at::TensorOptions().device(device), true);
  const auto* dev = reinterpret_cast<void* const*>(ptrs_dev.data_ptr<int64_t>());
  const cudaDataType_t type = cuda_type_of(dtype);
  const cublasComputeType_t compute =
      dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()
          ? CUBLAS_COMPUTE_32F_FAST_TF32
          : CUBLAS_COMPUTE_32F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmGroupedBatchedEx(
      handle, op_first.data(), op_second.data(), m.data(), n.data(), k.data(), alpha.data(),
      reinterpret_cast<const void* const*>(dev), type, ld_first.data(),
      reinterpret_cast<const void* const*>(dev + P), type, ld_second.data(), beta.data(),
      dev + 2 * P, type, ldc.data(), P, ones.data(), compute));
}

// int32 inclusive prefix sums of the group sizes on a's device: the offs of at::_grouped_mm.
at::Tensor device_offsets(const int64_t* gs, int64_t G, const at::Device& device) {
  at::Tensor host = at::empty({G}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* p = host.data_ptr<int32_t>();
  int64_t end = 0;
  for (int64_t g = 0; g < G; ++g) {
    end += gs[g];
    TORCH_CHECK_VALUE(end <= std::numeric_limits<int32_t>::max(),
                      "backend='torch' needs fewer than 2^31 rows, got ", end);
    p[g] = static_cast<int32_t>(end);
  }
  return host.to(at::TensorOptions().device(device), true);
}

// Zeroes grad_b[g] for the empty groups, one fill per run of consecutive empty groups.
void zero_empty_groups(at::Tensor& grad_b, const int64_t* gs, int64_t G) {
  for (int64_t g = 0; g < G;) {
    if (gs[g] != 0) {
      ++g;
      continue;
    }
    const int64_t first = g;
    while (g < G && gs[g] == 0) ++g;
    grad_b.narrow(0, first, g - first).zero_();
  }
}

// grad_b of the wgrad with the slices of the non-empty groups written (the others undefined).
at::Tensor wgrad_nonempty_groups(std::string_view use, const at::Tensor& a,
                                 const at::Tensor& grad_out, const int64_t* gs, int64_t G,
                                 bool trans_b, const std::vector<int64_t>& out_shape) {
  if (use == "torch") {
    const at::Tensor offs = device_offsets(gs, G, a.device());
    const at::Tensor r = trans_b ? at::_grouped_mm(grad_out.t(), a, offs)
                                 : at::_grouped_mm(a.t(), grad_out, offs);
    return r.contiguous();
  }
  at::Tensor grad_b = at::empty(out_shape, a.options());
  if (use == "cutlass") {
    grouped_gemm_wgrad_cutlass(a, grad_out, gs, trans_b, grad_b);
    return grad_b;
  }
  const std::vector<int64_t> row = group_row_starts(gs, G);
  if (use == "streams") {
    on_side_streams(gs, G, [&](int64_t g) {
      wgrad_one_group(a, grad_out, g, row[g], gs[g], trans_b, grad_b);
    });
    return grad_b;
  }
  cublas_grouped(wgrad_products(a, grad_out, gs, trans_b, grad_b), a.scalar_type(),
                 a.device());
  return grad_b;
}

}  // namespace

std::vector<RowMajorGemm> grouped_products(const at::Tensor& a, const at::Tensor& b,
                                           const int64_t* gs, bool trans_b, at::Tensor& out) {
  const int64_t G = b.size(0), K = a.size(1), N = out.size(1), elt = a.element_size();
  const char* pa = static_cast<const char*>(a.data_ptr());
  const char* pb = static_cast<const char*>(b.data_ptr());
  char* pc = static_cast<char*>(out.data_ptr());
  std::vector<RowMajorGemm> gemms;
  int64_t row = 0;
  for (int64_t g = 0; g < G; row += gs[g], ++g) {
    if (gs[g] == 0) continue;
    // b[g] is [K, N] row-major, or [N, K] (trans_b) with row stride K.
    gemms.push_back({pa + row * K * elt, K, false, pb + g * K * N * elt, trans_b ? K : N,
                     trans_b, pc + row * N * elt, N, gs[g], N, K});
  }
  return gemms;
}

std::vector<RowMajorGemm> wgrad_products(const at::Tensor& a, const at::Tensor& grad_out,
                                         const int64_t* gs, bool trans_b, at::Tensor& grad_b) {
  const int64_t G = grad_b.size(0), K = a.size(1), N = grad_out.size(1), elt = a.element_size();
  const char* pa = static_cast<const char*>(a.data_ptr());
  const char* po = static_cast<const char*>(grad_out.data_ptr());
  char* pc = static_cast<char*>(grad_b.data_ptr());
  std::vector<RowMajorGemm> gemms;
  int64_t row = 0;
  for (int64_t g = 0; g < G; row += gs[g], ++g) {
    if (gs[g] == 0) continue;
    const char* a_g = pa + row * K * elt;     // [m, K], row stride K
    const char* go_g = po + row * N * elt;    // [m, N], row stride N
    char* c = pc + g * K * N * elt;
    if (trans_b) {  // [N, K] = go_g^T @ a_g
      gemms.push_back({go_g, N, true, a_g, K, false, c, K, N, K, gs[g]});
    } else {  // [K, N] = a_g^T @ go_g
      gemms.push_back({a_g, K, true, go_g, N, false, c, N, K, N, gs[g]});
    }
  }
  return gemms;
}

#ifndef MOE_PARALLEL_WITH_CUTLASS  // unreachable: checked_backend rejects "cutlass" first
void grouped_gemm_cutlass(const at::Tensor&, const at::Tensor&, const int64_t*, bool,
                          at::Tensor&) {
  TORCH_CHECK(false, "backend='cutlass' was not built");
}
void grouped_gemm_wgrad_cutlass(const at::Tensor&, const at::Tensor&, const int64_t*, bool,
                                at::Tensor&) {
  TORCH_CHECK(false, "backend='cutlass' was not built");
}
#endif

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& group_sizes, bool trans_b,
                             c10::string_view backend) {
  check_grouped_gemm_args(a, b, group_sizes, trans_b);
  const std::string_view use = checked_backend(backend, a, group_sizes.size(0), false);
  const at::Tensor sizes = group_sizes.contiguous();
  const int64_t* gs = sizes.data_ptr<int64_t>();
  if (use == "loop") return grouped_gemm_loop(a, b, gs, trans_b);

  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "grouped_gemm needs contiguous a and b");
  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t G = b.size(0), N = trans_b ? b.size(1) : b.size(2);
  if (a.size(0) == 0) return at::empty({0, N}, a.options());
  if (use == "torch") {
    const at::Tensor offs = device_offsets(gs, G, a.device());
    return at::_grouped_mm(a, trans_b ? b.transpose(1, 2) : b, offs).contiguous();
  }
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  if (use == "cutlass") {
    grouped_gemm_cutlass(a, b, gs, trans_b, out);
    return out;
  }
  const std::vector<int64_t> row = group_row_starts(gs, G);
  if (use == "streams") {
    on_side_streams(gs, G,
                    [&](int64_t g) { gemm_one_group(a, b, g, row[g], gs[g], trans_b, out); });
    return out;
  }
  cublas_grouped(grouped_products(a, b, gs, trans_b, out), a.scalar_type(), a.device());
  return out;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& group_sizes, bool trans_b,
                                   c10::string_view backend) {
  check_grouped_gemm_wgrad_args(a, grad_out, group_sizes);
  const std::string_view use = checked_backend(backend, a, group_sizes.size(0), true);
  const at::Tensor sizes = group_sizes.contiguous();
  const int64_t* gs = sizes.data_ptr<int64_t>();
  const int64_t G = sizes.size(0), K = a.size(1), N = grad_out.size(1);
  if (use == "loop") return grouped_gemm_wgrad_loop(a, grad_out, gs, G, trans_b);

  TORCH_CHECK(a.is_contiguous() && grad_out.is_contiguous(),
              "grouped_gemm_wgrad needs contiguous a and grad_out");
  const c10::cuda::CUDAGuard device_guard(a.device());
  const std::vector<int64_t> out_shape =
      trans_b ? std::vector<int64_t>{G, N, K} : std::vector<int64_t>{G, K, N};
  if (a.size(0) == 0) return at::zeros(out_shape, a.options());
  // Every backend writes the non-empty groups only; the empty ones are zeroed after it.
  at::Tensor grad_b = wgrad_nonempty_groups(use, a, grad_out, gs, G, trans_b, out_shape);
  zero_empty_groups(grad_b, gs, G);
  return grad_b;
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA