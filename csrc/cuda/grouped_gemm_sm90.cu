// Grouped GEMM on Hopper (sm_90a) with CUTLASS 3.x ptr-array kernels: TMA loads, wgmma tensor
// cores, warp-specialized persistent CTAs walking every problem's tiles. bf16 in/out, fp32
// accumulation. The products are row-major GEMMs (RowMajorGemm, csrc/ops.h):
//   c (m x n, ldc) = op(a) (m x k) @ op(b) (k x n),   op = transpose when trans_a / trans_b,
// all with the same (trans_a, trans_b). Supported: (N, N) and (N, T) for the forward and
// (T, N) for the weight gradient. Every pointer 16-byte aligned, leading dimensions multiples
// of 8 elements, k > 0 (the callers leave empty groups out).
//
// Per call: the problem list (pointers, strides, shapes) goes to the device in one pinned-buffer
// copy on the current stream, then one kernel launch. Tile configuration: "cooperative"
// (128x256x64, as torch._grouped_mm takes for large problems) when the mean problem has m > 128
// and n > 128, else "pingpong_thin" (64x128x128); MOE_PARALLEL_SM90_TILE = cooperative |
// pingpong (128x128x64) | pingpong_thin forces one, for measuring them.
#if defined(MOE_PARALLEL_WITH_CUDA) && defined(MOE_PARALLEL_WITH_CUTLASS)

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <climits>
#include <cstdlib>
#include <cstdint>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "../ops.h"

namespace moe_parallel {
namespace {

using Element = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
constexpr int kAlign = 8;  // elements: 16-byte TMA accesses
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;

// Tile configurations (cta_m x cta_n x cta_k; cluster 2x1x1 for all).
struct Cooperative {  // 128x256x64, two consumer warp groups share each tile
  using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Pingpong {  // 128x128x64, the consumer warp groups alternate tiles (epilogue overlapped)
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};
struct PingpongThin {  // 64x128x128 pingpong, for problems of at most 128 rows or columns
  using Tile = cute::Shape<cute::_64, cute::_128, cute::_128>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// LayoutA / LayoutB: CUTLASS tags of A (m x k) and B (k x n); D is row-major. C is D with
// beta = 0 (never read).
template <typename LayoutA, typename LayoutB, typename Config>
struct Sm90Grouped {
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, RowMajor*, kAlign, Element, RowMajor*, kAlign, typename Config::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
      typename Config::Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Mainloop>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// A packed (rows, cols, batch) stride whose one dynamic mode is the leading dimension ld.
template <typename Stride>
Stride with_leading_dim(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

void check_status(cutlass::Status status, const char* step) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm (backend='cutlass'): CUTLASS ",
              step, " failed: ", cutlassGetStatusString(status));
}

// Writes 1 when the code running is this build's sm_90a code, whose CUTLASS kernels are the
// real ones (in other targets' code, sm_90 included, their bodies are empty).
__global__ void sm90a_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

bool runs_sm90a_code(const at::Device& device) {
  at::Tensor flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  sm90a_probe<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flag.item<int>() == 1;
}

template <typename G>
void run(const std::vector<RowMajorGemm>& problems, const at::Device& device) {
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename G::StrideA;
  using StrideB = typename G::StrideB;
  using StrideD = typename G::StrideD;
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8,
                "one 8-byte leading dimension per stride expected");
  const int64_t P = static_cast<int64_t>(problems.size());
  TORCH_CHECK(P <= INT_MAX, "grouped_gemm (backend='cutlass'): too many groups: ", P);
  // Layout of the one argument buffer (16-byte aligned arrays):
  // ptr_a[Pa], ptr_b[Pa], ptr_d[Pa], stride_a[Pa], stride_b[Pa], stride_d[Pa], shapes[P].
  const int64_t Pa = (P + 1) / 2 * 2;
  const int64_t bytes = 6 * Pa * 8 + P * static_cast<int64_t>(sizeof(Shape3));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.data_ptr());
  auto** ptr_a = reinterpret_cast<const Element**>(h);
  auto** ptr_b = ptr_a + Pa;
  auto** ptr_d = reinterpret_cast<Element**>(h + 2 * Pa * 8);
  auto* stride_a = reinterpret_cast<StrideA*>(ptr_d + Pa);
  auto* stride_b = reinterpret_cast<StrideB*>(stride_a + Pa);
  auto* stride_d = reinterpret_cast<StrideD*>(stride_b + Pa);
  auto* shapes = reinterpret_cast<Shape3*>(stride_d + Pa);
  for (int64_t p = 0; p < P; ++p) {
    const RowMajorGemm& q = problems[p];
    TORCH_CHECK_VALUE(q.m <= INT_MAX && q.n <= INT_MAX && q.k <= INT_MAX,
                      "grouped_gemm: backend='cutlass' needs sizes below 2^31, got (m, n, k) = (",
                      q.m, ", ", q.n, ", ", q.k, ")");
    ptr_a[p] = static_cast<const Element*>(q.a);
    ptr_b[p] = static_cast<const Element*>(q.b);
    ptr_d[p] = static_cast<Element*>(q.c);
    stride_a[p] = with_leading_dim<StrideA>(q.lda);
    stride_b[p] = with_leading_dim<StrideB>(q.ldb);
    stride_d[p] = with_leading_dim<StrideD>(q.ldc);
    shapes[p] = Shape3(static_cast<int32_t>(q.m), static_cast<int32_t>(q.n),
                       static_cast<int32_t>(q.k));
  }
  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);  // the host allocator keeps `host` until it is done
  auto* d = static_cast<uint8_t*>(dev.data_ptr());
  auto at_dev = [&](const void* host_ptr) {
    return d + (static_cast<const uint8_t*>(host_ptr) - h);
  };

  cutlass::KernelHardwareInfo hw;
  hw.device_id = device.index();
  hw.sm_count = at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {static_cast<int32_t>(P), reinterpret_cast<Shape3*>(at_dev(shapes)), shapes},
      {reinterpret_cast<const Element**>(at_dev(ptr_a)),
       reinterpret_cast<StrideA*>(at_dev(stride_a)),
       reinterpret_cast<const Element**>(at_dev(ptr_b)),
       reinterpret_cast<StrideB*>(at_dev(stride_b))},
      {{},
       reinterpret_cast<const Element**>(at_dev(ptr_d)),
       reinterpret_cast<StrideD*>(at_dev(stride_d)),
       reinterpret_cast<Element**>(at_dev(ptr_d)),
       reinterpret_cast<StrideD*>(at_dev(stride_d))},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;

  typename G::Gemm gemm;
  check_status(gemm.can_implement(args), "can_implement");
  const size_t workspace_bytes = G::Gemm::get_workspace_size(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                                   at::TensorOptions().dtype(at::kByte).device(device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_status(gemm.initialize(args, workspace.data_ptr(), stream), "initialize");
  check_status(gemm.run(stream), "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tile configuration: $MOE_PARALLEL_SM90_TILE when set, else by the mean problem (see the
// file comment); then the launch.
template <typename LayoutA, typename LayoutB>
void run_config(const std::vector<RowMajorGemm>& problems, const at::Device& device) {
  const char* env = std::getenv("MOE_PARALLEL_SM90_TILE");
  std::string_view tile = env != nullptr ? env : "";
  if (tile.empty()) {
    int64_t m = 0, n = 0;
    for (const RowMajorGemm& q : problems) {
      m += q.m;
      n += q.n;
    }
    const int64_t P = static_cast<int64_t>(problems.size());
    tile = m > 128 * P && n > 128 * P ? "cooperative" : "pingpong_thin";
  }
  if (tile == "cooperative") {
    run<Sm90Grouped<LayoutA, LayoutB, Cooperative>>(problems, device);
  } else if (tile == "pingpong") {
    run<Sm90Grouped<LayoutA, LayoutB, Pingpong>>(problems, device);
  } else if (tile == "pingpong_thin") {
    run<Sm90Grouped<LayoutA, LayoutB, PingpongThin>>(problems, device);
  } else {
    TORCH_CHECK_VALUE(false, "MOE_PARALLEL_SM90_TILE must be unset, 'cooperative', 'pingpong' or "
                      "'pingpong_thin', got '", tile, "'");
  }
}

}  // namespace

bool sm90_grouped_gemm_runs_on(const at::Device& device) {
  if (at::cuda::getDeviceProperties(device.index())->major != 9) return false;
  // Once per device (one launch and one host read).
  static std::mutex mutex;
  static std::unordered_map<int, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device.index());
  if (it == known.end()) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                    c10::cuda::CaptureStatus::None,
                "grouped_gemm (backend 'cutlass', or 'auto' for a bfloat16 wgrad): the first "
                "call on a device reads back a probe of the build's sm_90a code, so it cannot "
                "run inside CUDA graph capture; run one step before capturing");
    it = known.emplace(device.index(), runs_sm90a_code(device)).first;
  }
  return it->second;
}

void grouped_gemm_sm90(const std::vector<RowMajorGemm>& problems, const at::Device& device) {
  if (problems.empty()) return;
  const bool ta = problems.front().trans_a, tb = problems.front().trans_b;
  for (const RowMajorGemm& q : problems) {
    TORCH_CHECK(q.trans_a == ta && q.trans_b == tb && q.k > 0,
                "grouped_gemm_sm90: the problems must share one layout and have k > 0");
  }
  TORCH_CHECK(!(ta && tb), "grouped_gemm_sm90: transposed a and b together is not supported");
  if (ta) {
    run_config<ColumnMajor, RowMajor>(problems, device);
  } else if (tb) {
    run_config<RowMajor, ColumnMajor>(problems, device);
  } else {
    run_config<RowMajor, RowMajor>(problems, device);
  }
}

}  // namespace moe_parallel

#endif  // MOE_PARALLEL_WITH_CUDA && MOE_PARALLEL_WITH_CUTLASS
