// The counter-based hash of expert dropout, shared by the CPU kernel (csrc/cpu/dropout.cpp), the
// CUDA kernel (csrc/cuda/dropout.cu) and, written with int64 torch ops, the plain-PyTorch twin
// (moe_parallel/ops/dropout.py). All arithmetic is on uint32 (multiplication and addition wrap
// mod 2^32):
//   mix32(x)      = x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
//                   (a bijection of the 32-bit integers)
//   row_key(u, e) = mix32(u ^ mix32(e * 0x9E3779B9 + 0x7F4A7C15))
//   bits(u, e, j) = mix32(row_key(u, e) + j * 0x85EBCA77)
// for the row hash u (the low 32 bits of row_hash[r]), the global expert e and the global hidden
// unit j. Element (r, j) is kept when bits >= floor(p * 2^32).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_DROPOUT_HD __host__ __device__ __forceinline__
#else
#define MOE_DROPOUT_HD inline
#endif

namespace moe_parallel::dropout_hash {

constexpr uint32_t kMix1 = 0x21F0AAADu;
constexpr uint32_t kMix2 = 0x735A2D97u;
constexpr uint32_t kExpertMul = 0x9E3779B9u;
constexpr uint32_t kExpertAdd = 0x7F4A7C15u;
constexpr uint32_t kUnitMul = 0x85EBCA77u;

MOE_DROPOUT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  x ^= x >> 15;
  return x;
}

MOE_DROPOUT_HD uint32_t row_key(uint32_t u, uint32_t expert) {
  return mix32(u ^ mix32(expert * kExpertMul + kExpertAdd));
}

MOE_DROPOUT_HD uint32_t unit_bits(uint32_t key, uint32_t unit) {
  return mix32(key + unit * kUnitMul);
}

// floor(p * 2^32) for 0 <= p < 1 (exact: p * 2^32 is a power-of-two scaling of a double).
inline uint64_t threshold(double p) {
  return static_cast<uint64_t>(p * 4294967296.0);
}

}  // namespace moe_parallel::dropout_hash
