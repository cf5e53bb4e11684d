// swiglu (CPU): the SwiGLU activation of the first expert GEMM's output, fused in one pass.
//   h [N, 2F] = [gate | up];  out [N, F] = silu(gate) * up,  silu(g) = g * sigmoid(g).
// swiglu_backward: with s = sigmoid(g),
//   grad_gate = grad_out * up * s * (1 + g * (1 - s)),   grad_up = grad_out * g * s,
//   grad_h [N, 2F] = [grad_gate | grad_up].
// clamped_swiglu (GPT-OSS), with g = min(gate, L), u = clamp(up, -L, L), s = sigmoid(alpha * g):
//   out = (u + 1) * g * s;
//   grad_gate = grad_out * (u + 1) * s * (1 + alpha * g * (1 - s)) where gate < L, else 0,
//   grad_up = grad_out * g * s where -L < up < L, else 0 (torch.clamp's gradient: zero at the
//   bounds themselves).
// Math in float32 (float64 for float64, with std::exp). float32/bfloat16/float16 use a
// Cody-Waite + degree-5 polynomial exp (relative error ~2e-7 on silu); float32 rows run 8 columns
// at a time with AVX2+FMA where the CPU has them (checked at run time). Rows are split over
// OpenMP threads and every element is computed once, so results do not depend on the threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "parallel.h"

namespace moe_parallel {
namespace {

#if defined(__GNUC__)
#define MOE_INLINE inline __attribute__((always_inline))
#else
#define MOE_INLINE inline
#endif

// exp(x), x clamped to [-87.3, 88] (2^n stays a normal float: no inf, no denormals).
MOE_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

MOE_INLINE float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }
MOE_INLINE double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }

#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_HAVE_AVX2 1
#define MOE_AVX2 __attribute__((target("avx2,fma")))

// exp_approx on 8 floats: the same clamp, reduction and polynomial.
MOE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
}

MOE_AVX2 inline __m256 sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

// The vector body of one float32 row, 8 columns per step; returns where the scalar tail starts.
MOE_AVX2 int64_t fwd_row_avx2(const float* gate, const float* up, float* o, int64_t F) {
  const int64_t F8 = F - F % 8;
  for (int64_t j = 0; j < F8; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 silu = _mm256_mul_ps(g, sigmoid8(g));
    _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
  }
  return F8;
}

MOE_AVX2 int64_t bwd_row_avx2(const float* gate, const float* up, const float* go, float* gg,
                              float* gu, int64_t F) {
  const int64_t F8 = F - F % 8;
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t j = 0; j < F8; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 s = sigmoid8(g);
    const __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(go + j), s);
    const __m256 slope = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);  // 1 + g (1 - s)
    _mm256_storeu_ps(gg + j, _mm256_mul_ps(_mm256_mul_ps(ds, _mm256_loadu_ps(up + j)), slope));
    _mm256_storeu_ps(gu + j, _mm256_mul_ps(ds, g));
  }
  return F8;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// Whether scalar_t rows take the AVX2 body (float32 on a CPU with AVX2 and FMA).
template <typename scalar_t>
bool use_avx2() {
#ifdef MOE_HAVE_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) return cpu_has_avx2();
#endif
  return false;
}

template <typename scalar_t>
void fwd_rows(const scalar_t* h, scalar_t* out, int64_t r0, int64_t r1, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool vec = use_avx2<scalar_t>();
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    scalar_t* o = out + r * F;
    int64_t j = 0;
#ifdef MOE_HAVE_AVX2
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (vec) j = fwd_row_avx2(gate, up, o, F);
    }
#endif
    for (; j < F; ++j) {
      const acc_t g = static_cast<acc_t>(gate[j]);
      o[j] = static_cast<scalar_t>(g * sigmoid(g) * static_cast<acc_t>(up[j]));
    }
  }
}

template <typename scalar_t>
void bwd_rows(const scalar_t* grad_out, const scalar_t* h, scalar_t* grad_h, int64_t r0,
              int64_t r1, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool vec = use_avx2<scalar_t>();
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    const scalar_t* go = grad_out + r * F;
    scalar_t* gg = grad_h + r * 2 * F;
    scalar_t* gu = gg + F;
    int64_t j = 0;
#ifdef MOE_HAVE_AVX2
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (vec) j = bwd_row_avx2(gate, up, go, gg, gu, F);
    }
#endif
    for (; j < F; ++j) {
      const acc_t g = static_cast<acc_t>(gate[j]);
      const acc_t s = sigmoid(g);
      const acc_t ds = static_cast<acc_t>(go[j]) * s;
      const acc_t slope = acc_t(1) + g * (acc_t(1) - s);
      gg[j] = static_cast<scalar_t>(ds * static_cast<acc_t>(up[j]) * slope);
      gu[j] = static_cast<scalar_t>(ds * g);
    }
  }
}

// Calls body(r0, r1) on contiguous row ranges covering [0, N), one per thread.
template <typename Body>
void over_rows(int64_t N, int64_t work, const Body& body) {
  const int64_t C = num_chunks(N, work);
#pragma omp parallel for schedule(static) num_threads(C) if (C > 1)
  for (int64_t c = 0; c < C; ++c) {
    const int64_t per = (N + C - 1) / C;
    const int64_t r0 = std::min(N, c * per), r1 = std::min(N, r0 + per);
    if (r0 < r1) body(r0, r1);
  }
}

// clamped_swiglu rows (scalar: one pass, same sigmoid as swiglu).
template <typename scalar_t>
void clamped_fwd_rows(const scalar_t* h, scalar_t* out, int64_t r0, int64_t r1, int64_t F,
                      double alpha, double limit) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(alpha), L = static_cast<acc_t>(limit);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    scalar_t* o = out + r * F;
    for (int64_t j = 0; j < F; ++j) {
      const acc_t g = std::min(static_cast<acc_t>(gate[j]), L);
      const acc_t u = std::min(std::max(static_cast<acc_t>(up[j]), -L), L);
      o[j] = static_cast<scalar_t>((u + acc_t(1)) * g * sigmoid(a * g));
    }
  }
}

template <typename scalar_t>
void clamped_bwd_rows(const scalar_t* grad_out, const scalar_t* h, scalar_t* grad_h, int64_t r0,
                      int64_t r1, int64_t F, double alpha, double limit) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(alpha), L = static_cast<acc_t>(limit);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    const scalar_t* go = grad_out + r * F;
    scalar_t* gg = grad_h + r * 2 * F;
    scalar_t* gu = gg + F;
    for (int64_t j = 0; j < F; ++j) {
      const acc_t graw = static_cast<acc_t>(gate[j]), uraw = static_cast<acc_t>(up[j]);
      const acc_t g = std::min(graw, L);
      const acc_t u = std::min(std::max(uraw, -L), L);
      const acc_t s = sigmoid(a * g);
      const acc_t d = static_cast<acc_t>(go[j]);
      const acc_t dg = d * (u + acc_t(1)) * s * (acc_t(1) + a * g * (acc_t(1) - s));
      gg[j] = static_cast<scalar_t>(graw < L ? dg : acc_t(0));
      gu[j] = static_cast<scalar_t>(uraw > -L && uraw < L ? d * g * s : acc_t(0));
    }
  }
}

// out [N, F] from h [N, 2F]: rows(h, out, r0, r1, F) over OpenMP row ranges, per dtype.
template <typename Rows>
at::Tensor forward_op(const at::Tensor& h_in, const Rows& rows) {
  check_swiglu_args(h_in);
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor out = at::empty({N, F}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_cpu", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    over_rows(N, N * F, [&](int64_t r0, int64_t r1) { rows(hp, op, r0, r1, F); });
  });
  return out;
}

// grad_h [N, 2F] from grad_out [N, F] and h: rows(grad_out, h, grad_h, r0, r1, F).
template <typename Rows>
at::Tensor backward_op(const at::Tensor& grad_out_in, const at::Tensor& h_in, const Rows& rows) {
  check_swiglu_backward_args(grad_out_in, h_in);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward_cpu", [&] {
        const scalar_t* gp = grad_out.data_ptr<scalar_t>();
        const scalar_t* hp = h.data_ptr<scalar_t>();
        scalar_t* out = grad_h.data_ptr<scalar_t>();
        over_rows(N, 2 * N * F, [&](int64_t r0, int64_t r1) { rows(gp, hp, out, r0, r1, F); });
      });
  return grad_h;
}

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& h) {
  return forward_op(h, [](const auto* hp, auto* op, int64_t r0, int64_t r1, int64_t F) {
    fwd_rows(hp, op, r0, r1, F);
  });
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h) {
  return backward_op(grad_out, h, [](const auto* gp, const auto* hp, auto* out, int64_t r0,
                                     int64_t r1, int64_t F) { bwd_rows(gp, hp, out, r0, r1, F); });
}

at::Tensor clamped_swiglu_cpu(const at::Tensor& h, double alpha, double limit) {
  return forward_op(h, [=](const auto* hp, auto* op, int64_t r0, int64_t r1, int64_t F) {
    clamped_fwd_rows(hp, op, r0, r1, F, alpha, limit);
  });
}

at::Tensor clamped_swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h,
                                       double alpha, double limit) {
  return backward_op(grad_out, h, [=](const auto* gp, const auto* hp, auto* out, int64_t r0,
                                      int64_t r1, int64_t F) {
    clamped_bwd_rows(gp, hp, out, r0, r1, F, alpha, limit);
  });
}

}  // namespace moe_parallel
