// Op schemas of the moe_parallel library and their CPU kernels. CUDA kernels are
// registered in csrc/cuda/register_cuda.cpp; autograd and fake (meta) implementations in
// moe_parallel/ops/<family>.py. Semantics: see the comments of the kernels and csrc/ops.h.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(moe_parallel, m) {
  m.def(
      "permute(Tensor x, Tensor expert_idx, int num_experts, Tensor? keep=None, SymInt pad_to=0,"
      " bool validate=True) -> (Tensor permuted, Tensor row_map, Tensor tokens_per_expert)");
  m.def(
      "unpermute(Tensor y, Tensor row_map, Tensor? probs, SymInt num_tokens, bool validate=True)"
      " -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor row_map, Tensor? probs,"
      " SymInt num_rows, bool validate=True) -> (Tensor grad_y, Tensor grad_probs)");
  m.def("sort_chunks(Tensor x, Tensor split_sizes, Tensor order) -> Tensor");
  m.def(
      "grouped_gemm(Tensor a, Tensor b, Tensor group_sizes, bool trans_b=False,"
      " str backend='auto') -> Tensor");
  m.def(
      "grouped_gemm_wgrad(Tensor a, Tensor grad_out, Tensor group_sizes, bool trans_b=False,"
      " str backend='auto') -> Tensor");
  m.def(
      "block_topology(Tensor tokens_per_expert, int block_size, int n_col_blocks) -> (Tensor"
      " padded_offsets, Tensor block_row, Tensor block_col, Tensor row_ptr, Tensor col_ptr,"
      " Tensor transpose_idx)");
  m.def(
      "bsr_sdd(Tensor x, Tensor w, Tensor block_row, Tensor block_col, int block_size)"
      " -> Tensor");
  m.def(
      "bsr_dsd(Tensor blocks, Tensor w, Tensor row_ptr, Tensor block_col, int num_rows)"
      " -> Tensor");
  m.def(
      "bsr_wgrad(Tensor x, Tensor blocks, Tensor block_row, Tensor col_ptr,"
      " Tensor transpose_idx, int num_experts, bool trans=False) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor h) -> Tensor");
  m.def("clamped_swiglu(Tensor h, float alpha, float limit) -> Tensor");
  m.def(
      "clamped_swiglu_backward(Tensor grad_out, Tensor h, float alpha, float limit)"
      " -> Tensor");
  m.def(
      "expert_dropout(Tensor a, Tensor row_hash, Tensor group_sizes, int first_expert,"
      " int unit_offset, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_parallel, CPU, m) {
  m.impl("permute", &moe_parallel::permute_cpu);
  m.impl("unpermute", &moe_parallel::unpermute_cpu);
  m.impl("unpermute_backward", &moe_parallel::unpermute_backward_cpu);
  m.impl("sort_chunks", &moe_parallel::sort_chunks_impl);
  m.impl("grouped_gemm", &moe_parallel::grouped_gemm_impl);
  m.impl("grouped_gemm_wgrad", &moe_parallel::grouped_gemm_wgrad_impl);
  m.impl("block_topology", &moe_parallel::block_topology_impl);
  m.impl("bsr_sdd", &moe_parallel::bsr_sdd_impl);
  m.impl("bsr_dsd", &moe_parallel::bsr_dsd_impl);
  m.impl("bsr_wgrad", &moe_parallel::bsr_wgrad_impl);
  m.impl("swiglu", &moe_parallel::swiglu_cpu);
  m.impl("swiglu_backward", &moe_parallel::swiglu_backward_cpu);
  m.impl("clamped_swiglu", &moe_parallel::clamped_swiglu_cpu);
  m.impl("clamped_swiglu_backward", &moe_parallel::clamped_swiglu_backward_cpu);
  m.impl("expert_dropout", &moe_parallel::expert_dropout_cpu);
}
