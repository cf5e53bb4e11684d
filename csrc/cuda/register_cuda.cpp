// CUDA implementations of the moe_parallel ops (schemas live in csrc/registry.cpp).
// permute/unpermute/unpermute_backward, swiglu(_backward), expert_dropout and the grouped GEMMs
// (by backend) use csrc/cuda; sort_chunks and the block-sparse products (bsr_sdd/bsr_dsd/bsr_wgrad, one
// cuBLAS GEMM per expert panel, with the block topology kept on the host) use the
// device-generic implementations.
#ifdef MOE_PARALLEL_WITH_CUDA

#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(moe_parallel, CUDA, m) {
  m.impl("permute", &moe_parallel::permute_cuda);
  m.impl("unpermute", &moe_parallel::unpermute_cuda);
  m.impl("unpermute_backward", &moe_parallel::unpermute_backward_cuda);
  m.impl("sort_chunks", &moe_parallel::sort_chunks_impl);
  m.impl("grouped_gemm", &moe_parallel::grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &moe_parallel::grouped_gemm_wgrad_cuda);
  m.impl("bsr_sdd", &moe_parallel::bsr_sdd_impl);
  m.impl("bsr_dsd", &moe_parallel::bsr_dsd_impl);
  m.impl("bsr_wgrad", &moe_parallel::bsr_wgrad_impl);
  m.impl("swiglu", &moe_parallel::swiglu_cuda);
  m.impl("swiglu_backward", &moe_parallel::swiglu_backward_cuda);
  m.impl("clamped_swiglu", &moe_parallel::clamped_swiglu_cuda);
  m.impl("clamped_swiglu_backward", &moe_parallel::clamped_swiglu_backward_cuda);
  m.impl("expert_dropout", &moe_parallel::expert_dropout_cuda);
}

#endif  // MOE_PARALLEL_WITH_CUDA
