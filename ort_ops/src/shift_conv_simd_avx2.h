// ISA traits of shift_conv_simd.h for AVX2: 8 int32 lanes per ymm.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "shift_conv_common.h"

#define SC_TARGET __attribute__((target("avx2,fma")))
#define SC_INLINE SC_TARGET __attribute__((always_inline)) static inline

namespace mfconvert {
namespace {

struct SimdAvx2 {
  static constexpr int kVectors = 4;  // V: vectors of flat outputs per pass over the weights
  static constexpr int kLanes = 8;
  using I = __m256i;
  using F = __m256;
  SC_INLINE I Zero() { return _mm256_setzero_si256(); }
  SC_INLINE I Set1(int32_t v) { return _mm256_set1_epi32(v); }
  SC_INLINE I Load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  SC_INLINE I Add(I a, I b) { return _mm256_add_epi32(a, b); }
  SC_INLINE I Sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  SC_INLINE I Abs(I a) { return _mm256_abs_epi32(a); }
  SC_INLINE I Srav(I a, I n) { return _mm256_srav_epi32(a, n); }
  SC_INLINE F ToF(I a) { return _mm256_cvtepi32_ps(a); }  // rounds to nearest even
  SC_INLINE F Set1F(float v) { return _mm256_set1_ps(v); }
  SC_INLINE F AddF(F a, F b) { return _mm256_add_ps(a, b); }
  SC_INLINE F SubF(F a, F b) { return _mm256_sub_ps(a, b); }
  SC_INLINE F MulF(F a, F b) { return _mm256_mul_ps(a, b); }
  // min(max(y, lo), hi) keeping NaN: maxps/minps return their second operand when one is NaN.
  SC_INLINE F Clamp(F y, F lo, F hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, y)); }
  SC_INLINE void StoreF(float* p, F v) { _mm256_storeu_ps(p, v); }
  SC_INLINE void AddTo64(int64_t* w, I v) {
    const __m256i a = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
    const __m256i b = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
    __m256i* p = reinterpret_cast<__m256i*>(w);
    _mm256_storeu_si256(p, _mm256_add_epi64(_mm256_loadu_si256(p), a));
    _mm256_storeu_si256(p + 1, _mm256_add_epi64(_mm256_loadu_si256(p + 1), b));
  }
  // float32 of 8 int64 (AVX2 has no vector conversion; cvtsi2ss rounds to nearest even).
  SC_INLINE F Int64ToF(const int64_t* w) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(w[i]);
    return _mm256_load_ps(f);
  }
  // sat_A(floor(x * 2^F)) per lane, NaN -> 0.
  SC_INLINE I Quantize(__m256 x, const ActQuant& q) {
    const __m256 f = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(q.scale)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256i r = _mm256_cvttps_epi32(f);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(q.qhi), _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(q.hi), _CMP_GE_OQ)));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(q.qlo), _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(q.lo), _CMP_LE_OQ)));
    return _mm256_and_si256(r, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));
  }
  // A stride-2 row split into its phases (as SimdAvx512::QuantizeSplit2), 8 values per phase and step.
  SC_TARGET static void QuantizeSplit2(const float* x, int64_t w, int64_t pad, int64_t wq, const ActQuant* q,
                                       int32_t* even, int32_t* odd) {
    auto one = [&](int64_t p) -> int32_t {
      const int64_t k = p - pad;
      if (k < 0 || k >= w) return 0;
      if (q != nullptr) return ConvQuantize(x[k], *q);
      int32_t bits;
      std::memcpy(&bits, x + k, 4);
      return bits;
    };
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    int64_t i = 0;
    for (; i < wq && 2 * i < pad; ++i) {
      even[i] = one(2 * i);
      odd[i] = one(2 * i + 1);
    }
    for (; i + 8 <= wq && 2 * i - pad + 16 <= w; i += 8) {
      const float* s = x + (2 * i - pad);
      __m256i a, b;
      if (q != nullptr) {
        a = Quantize(_mm256_loadu_ps(s), *q);
        b = Quantize(_mm256_loadu_ps(s + 8), *q);
      } else {
        a = _mm256_castps_si256(_mm256_loadu_ps(s));
        b = _mm256_castps_si256(_mm256_loadu_ps(s + 8));
      }
      a = _mm256_permutevar8x32_epi32(a, perm);
      b = _mm256_permutevar8x32_epi32(b, perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(even + i), _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd + i), _mm256_permute2x128_si256(a, b, 0x31));
    }
    for (; i < wq; ++i) {
      even[i] = one(2 * i);
      odd[i] = one(2 * i + 1);
    }
  }
  SC_TARGET static void QuantizeRow(const float* x, int64_t n, const ActQuant& q, int32_t* out) {
    const __m256 scale = _mm256_set1_ps(q.scale), hi = _mm256_set1_ps(q.hi), lo = _mm256_set1_ps(q.lo);
    const __m256i qhi = _mm256_set1_epi32(q.qhi), qlo = _mm256_set1_epi32(q.qlo);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 f = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale),
                                       _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      __m256i r = _mm256_cvttps_epi32(f);
      r = _mm256_blendv_epi8(r, qhi, _mm256_castps_si256(_mm256_cmp_ps(f, hi, _CMP_GE_OQ)));
      r = _mm256_blendv_epi8(r, qlo, _mm256_castps_si256(_mm256_cmp_ps(f, lo, _CMP_LE_OQ)));
      r = _mm256_and_si256(r, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));  // NaN -> 0
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), r);
    }
    for (; i < n; ++i) out[i] = ConvQuantize(x[i], q);
  }
};

}  // namespace
}  // namespace mfconvert
