// CUDA implementations of the moe_parallel ops (schemas live in csrc/registry.cpp).
// permute/unpermute/unpermute_backward use the kernels in csrc/cuda; sort_chunks and the
// grouped GEMMs use the device-generic implementations (ATen copies and cuBLAS GEMMs).
#ifdef MOE_PARALLEL_WITH_CUDA

#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(moe_parallel, CUDA, m) {
  m.impl("permute", &moe_parallel::permute_cuda);
  m.impl("unpermute", &moe_parallel::unpermute_cuda);
  m.impl("unpermute_backward", &moe_parallel::unpermute_backward_cuda);
  m.impl("sort_chunks", &moe_parallel::sort_chunks_impl);
  m.impl("grouped_gemm", &moe_parallel::grouped_gemm_impl);
  m.impl("grouped_gemm_wgrad", &moe_parallel::grouped_gemm_wgrad_impl);
}

#endif  // MOE_PARALLEL_WITH_CUDA
