// Backend "cutlass" of the grouped GEMM: on sm_90 with an sm_90a build the CUTLASS 3.x Hopper
// kernels (csrc/cuda/grouped_gemm_sm90.cu), elsewhere CUTLASS 2.x grouped kernels (Sm80 tensor
// ops, bf16 in/out, fp32 accumulation). Group g = the next group_sizes[g] rows of a (and
// grad_out):
//   grouped_gemm_cutlass:       out_g = a_g @ b[g]             b [G,K,N]
//                               out_g = a_g @ b[g]^T           b [G,N,K] (trans_b)
//   grouped_gemm_wgrad_cutlass: grad_b[g] = a_g^T @ grad_out_g       [G,K,N]
//                               grad_b[g] = grad_out_g^T @ a_g       [G,N,K] (trans_b)
//                               for the non-empty groups (the caller zeroes the others).
// out / grad_b are preallocated, contiguous. All operands bf16, contiguous, 16-byte aligned, and K
// and N multiples of 8 (128-bit accesses). One launch per call: empty groups are left out of the
// problem list; per-problem sizes, pointers and leading dimensions go to the device in one
// pinned-buffer copy on the current stream, and the kernel walks the problems on the device
// (GroupScheduleMode::kDeviceOnly).
#ifdef MOE_PARALLEL_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

#include "../ops.h"

namespace moe_parallel {
namespace {

using Element = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements = 16 bytes

// One tile configuration for every layout: 128x128x32 threadblock, 2x2 warps of 64x64x32,
// m16n8k16 bf16 mma, 4 stages (64 KiB shared memory; ~255 registers a thread, no spills, so
// one resident block per SM on A100 and H100).
template <typename LayoutA, typename LayoutB>
using GroupedGemm = cutlass::gemm::device::GemmGrouped<
    typename cutlass::gemm::kernel::DefaultGemmGrouped<
        Element, LayoutA, cutlass::ComplexTransform::kNone, kAlign,
        Element, LayoutB, cutlass::ComplexTransform::kNone, kAlign,
        Element, RowMajor, float,
        cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
        cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
        cutlass::gemm::GemmShape<16, 8, 16>,
        cutlass::epilogue::thread::LinearCombination<Element, kAlign, float, float>,
        cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
        cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel>;

using GemmNN = GroupedGemm<RowMajor, RowMajor>;     // forward
using GemmNT = GroupedGemm<RowMajor, ColumnMajor>;  // forward, trans_b
using GemmTN = GroupedGemm<ColumnMajor, RowMajor>;  // wgrad (both orientations)

void check_status(cutlass::Status status, const char* step) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm (backend='cutlass'): CUTLASS ",
              step, " failed: ", cutlassGetStatusString(status));
}

// Runs every product in one grouped launch on the current stream; the kernel's layouts match
// the products' transposes (a transposed row-major operand is the column-major one with the
// same leading dimension; C row-major). The device-side argument
// arrays are, in one buffer: ptr_A[P], ptr_B[P], ptr_D[P], lda[P], ldb[P], ldd[P] (8 bytes
// each), then problem_sizes[P] (GemmCoord (m, n, k)). C is D with beta = 0 (never read).
template <typename Gemm>
void run_grouped(const std::vector<RowMajorGemm>& problems, const at::Device& device) {
  static_assert(sizeof(Element*) == sizeof(int64_t), "8-byte pointers expected");
  static_assert(std::is_same<typename Gemm::LayoutA::Stride::LongIndex, int64_t>::value &&
                std::is_same<typename Gemm::LayoutB::Stride::LongIndex, int64_t>::value &&
                std::is_same<typename Gemm::LayoutC::Stride::LongIndex, int64_t>::value,
                "int64 leading dimensions expected");
  using cutlass::gemm::GemmCoord;
  const int64_t P = static_cast<int64_t>(problems.size());
  if (P == 0) return;
  const int64_t words = 6 * P;
  const int64_t bytes = words * 8 + P * static_cast<int64_t>(sizeof(GemmCoord));

  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.data_ptr());
  auto** ptr_a = reinterpret_cast<Element**>(h);
  auto** ptr_b = ptr_a + P;
  auto** ptr_d = ptr_b + P;
  auto* ld = reinterpret_cast<int64_t*>(ptr_d + P);  // lda, ldb, ldd
  auto* sizes = reinterpret_cast<GemmCoord*>(h + words * 8);
  for (int64_t p = 0; p < P; ++p) {
    const RowMajorGemm& q = problems[p];
    TORCH_CHECK_VALUE(q.m <= INT_MAX && q.n <= INT_MAX && q.k <= INT_MAX,
                      "grouped_gemm: backend='cutlass' needs sizes below 2^31, got (m, n, k) = (",
                      q.m, ", ", q.n, ", ", q.k, ")");
    ptr_a[p] = static_cast<Element*>(const_cast<void*>(q.a));
    ptr_b[p] = static_cast<Element*>(const_cast<void*>(q.b));
    ptr_d[p] = static_cast<Element*>(q.c);
    ld[p] = q.lda;
    ld[P + p] = q.ldb;
    ld[2 * P + p] = q.ldc;
    sizes[p] = GemmCoord(static_cast<int>(q.m), static_cast<int>(q.n), static_cast<int>(q.k));
  }

  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);  // the host allocator keeps `host` until it is done
  auto* d = static_cast<uint8_t*>(dev.data_ptr());
  auto at_dev = [&](const void* host_ptr) {
    return d + (static_cast<const uint8_t*>(host_ptr) - h);
  };
  auto** dev_ptr_a = reinterpret_cast<Element**>(at_dev(ptr_a));
  auto** dev_ptr_b = reinterpret_cast<Element**>(at_dev(ptr_b));
  auto** dev_ptr_d = reinterpret_cast<Element**>(at_dev(ptr_d));
  auto* dev_ld = reinterpret_cast<int64_t*>(at_dev(ld));
  auto* dev_sizes = reinterpret_cast<GemmCoord*>(at_dev(sizes));

  // Persistent threadblocks: min(tiles, SMs x resident blocks per SM).
  const int threadblocks = Gemm::sufficient(sizes, static_cast<int>(P));
  TORCH_CHECK(threadblocks > 0,
              "grouped_gemm (backend='cutlass'): CUTLASS could not size the launch "
              "(occupancy query failed)");

  typename Gemm::Arguments args(dev_sizes, static_cast<int>(P), threadblocks,
                                typename Gemm::EpilogueOutputOp::Params(1.0f, 0.0f),
                                dev_ptr_a, dev_ptr_b, dev_ptr_d, dev_ptr_d,
                                dev_ld, dev_ld + P, dev_ld + 2 * P, dev_ld + 2 * P, sizes);
  check_status(Gemm::can_implement(args), "can_implement");
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                          at::TensorOptions().dtype(at::kByte).device(device));
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Gemm gemm;
  check_status(gemm.initialize(args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream),
               "initialize");
  check_status(gemm.run(stream), "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The products in one launch: the Hopper kernels where they run (they take the layout from the
// problems), else Sm80Gemm, the CUTLASS 2.x kernel of the products' layout.
template <typename Sm80Gemm>
void launch(const std::vector<RowMajorGemm>& problems, const at::Device& device) {
  if (sm90_grouped_gemm_runs_on(device)) {
    grouped_gemm_sm90(problems, device);
  } else {
    run_grouped<Sm80Gemm>(problems, device);
  }
}

// What the kernels need of every operand: CUDA bf16, contiguous, 16-byte aligned, on one device.
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& a) {
  TORCH_CHECK(t.is_cuda() && t.device() == a.device(), "grouped_gemm (backend='cutlass'): ", name,
              " must be on ", a.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kBFloat16,
                    "grouped_gemm (backend='cutlass') needs bfloat16, got ", name, " of ",
                    t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "grouped_gemm (backend='cutlass'): ", name,
              " must be contiguous");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0,
                    "grouped_gemm (backend='cutlass') needs 16-byte aligned tensors, ", name,
                    " is not");
}

void check_dims(int64_t K, int64_t N) {
  TORCH_CHECK_VALUE(K % kAlign == 0, "grouped_gemm: backend='cutlass' needs K and N multiples of ",
                    kAlign, ", got K=", K);
  TORCH_CHECK_VALUE(N % kAlign == 0, "grouped_gemm: backend='cutlass' needs K and N multiples of ",
                    kAlign, ", got N=", N);
}

}  // namespace

void grouped_gemm_cutlass(const at::Tensor& a, const at::Tensor& b, const int64_t* group_sizes,
                          bool trans_b, at::Tensor& out) {
  check_operand(a, "a", a);
  check_operand(b, "b", a);
  check_operand(out, "out", a);
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N,
              "grouped_gemm (backend='cutlass'): out must be [", M, ", ", N, "], got ",
              out.sizes());
  check_dims(K, N);
  const c10::cuda::CUDAGuard guard(a.device());
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const std::vector<RowMajorGemm> problems = grouped_products(a, b, group_sizes, trans_b, out);
  if (trans_b) {
    launch<GemmNT>(problems, a.device());
  } else {
    launch<GemmNN>(problems, a.device());
  }
}

void grouped_gemm_wgrad_cutlass(const at::Tensor& a, const at::Tensor& grad_out,
                                const int64_t* group_sizes, bool trans_b, at::Tensor& grad_b) {
  check_operand(a, "a", a);
  check_operand(grad_out, "grad_out", a);
  check_operand(grad_b, "grad_b", a);
  const int64_t M = a.size(0), K = a.size(1), N = grad_out.size(1), G = grad_b.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M,
              "grouped_gemm (backend='cutlass'): grad_out must have ", M, " rows, got ",
              grad_out.sizes());
  TORCH_CHECK(grad_b.dim() == 3 && grad_b.size(1) == (trans_b ? N : K) &&
                  grad_b.size(2) == (trans_b ? K : N),
              "grouped_gemm (backend='cutlass'): grad_b must be [", G, ", ", trans_b ? N : K,
              ", ", trans_b ? K : N, "], got ", grad_b.sizes());
  check_dims(K, N);
  const c10::cuda::CUDAGuard guard(a.device());
  if (K == 0 || N == 0 || G == 0) return;
  // Both orientations are a transposed (column-major) A times a row-major B.
  const std::vector<RowMajorGemm> problems =
      wgrad_products(a, grad_out, group_sizes, trans_b, grad_b);
  launch<GemmTN>(problems, a.device());
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA
