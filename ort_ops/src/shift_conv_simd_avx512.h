// ISA traits of shift_conv_simd.h for AVX-512 (F, BW, DQ, VL): 16 int32 lanes per zmm.
#pragma once

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "shift_conv_common.h"

#define SC_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define SC_INLINE SC_TARGET __attribute__((always_inline)) static inline

namespace mfconvert {
namespace {

struct SimdAvx512 {
  static constexpr int kVectors = 8;  // V: vectors of flat outputs per pass over the weights
  static constexpr int kLanes = 16;
  using I = __m512i;
  using F = __m512;
  SC_INLINE I Zero() { return _mm512_setzero_si512(); }
  SC_INLINE I Set1(int32_t v) { return _mm512_set1_epi32(v); }
  SC_INLINE I Load(const int32_t* p) { return _mm512_loadu_si512(p); }
  SC_INLINE I Add(I a, I b) { return _mm512_add_epi32(a, b); }
  SC_INLINE I Sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  SC_INLINE I Abs(I a) { return _mm512_abs_epi32(a); }
  SC_INLINE I Srav(I a, I n) { return _mm512_srav_epi32(a, n); }
  SC_INLINE F ToF(I a) { return _mm512_cvtepi32_ps(a); }  // rounds to nearest even
  SC_INLINE F Set1F(float v) { return _mm512_set1_ps(v); }
  SC_INLINE F AddF(F a, F b) { return _mm512_add_ps(a, b); }
  SC_INLINE F SubF(F a, F b) { return _mm512_sub_ps(a, b); }
  SC_INLINE F MulF(F a, F b) { return _mm512_mul_ps(a, b); }
  // min(max(y, lo), hi) keeping NaN: maxps/minps return their second operand when one is NaN.
  SC_INLINE F Clamp(F y, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, y)); }
  SC_INLINE void StoreF(float* p, F v) { _mm512_storeu_ps(p, v); }
  // w[0..16) += the lanes of v, sign-extended.
  SC_INLINE void AddTo64(int64_t* w, I v) {
    const __m512i a = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
    const __m512i b = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1));
    _mm512_storeu_si512(w, _mm512_add_epi64(_mm512_loadu_si512(w), a));
    _mm512_storeu_si512(w + 8, _mm512_add_epi64(_mm512_loadu_si512(w + 8), b));
  }
  // float32 of 16 int64 (vcvtqq2ps: nearest even).
  SC_INLINE F Int64ToF(const int64_t* w) {
    const __m256 a = _mm512_cvtepi64_ps(_mm512_loadu_si512(w));
    const __m256 b = _mm512_cvtepi64_ps(_mm512_loadu_si512(w + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
  }
  // sat_A(floor(x * 2^F)) per lane, NaN -> 0.
  SC_INLINE I Quantize(__m512 x, const ActQuant& q) {
    const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(q.scale)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512i r = _mm512_cvttps_epi32(f);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, _mm512_set1_ps(q.hi), _CMP_GE_OQ), _mm512_set1_epi32(q.qhi));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, _mm512_set1_ps(q.lo), _CMP_LE_OQ), _mm512_set1_epi32(q.qlo));
    return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), r);
  }
  // A stride-2 row: padded position p = 2 i + phase (phase 0: even, 1: odd; i < wq) holds
  // x[p - pad] quantised (q null: its float bits) when 0 <= p - pad < w, else 0. The interior is
  // quantised and de-interleaved in registers (one permute per 16 values and phase), so the row
  // is never stored whole and read back (a store-forwarding stall per load when pad is odd).
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
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    int64_t i = 0;
    for (; i < wq && 2 * i < pad; ++i) {
      even[i] = one(2 * i);
      odd[i] = one(2 * i + 1);
    }
    for (; i + 16 <= wq && 2 * i - pad + 32 <= w; i += 16) {
      const float* s = x + (2 * i - pad);
      __m512i a, b;
      if (q != nullptr) {
        a = Quantize(_mm512_loadu_ps(s), *q);
        b = Quantize(_mm512_loadu_ps(s + 16), *q);
      } else {
        a = _mm512_castps_si512(_mm512_loadu_ps(s));
        b = _mm512_castps_si512(_mm512_loadu_ps(s + 16));
      }
      _mm512_storeu_si512(even + i, _mm512_permutex2var_epi32(a, ie, b));
      _mm512_storeu_si512(odd + i, _mm512_permutex2var_epi32(a, io, b));
    }
    for (; i < wq; i += 16) {  // the tail, masked: lanes past x read as 0 (0 quantises to 0)
      const int64_t base = 2 * i - pad, left = w - base;  // base >= 0 here
      const __mmask16 ma = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      const __mmask16 mb = left >= 32 ? 0xFFFF : left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1);
      const __mmask16 mo = wq - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (wq - i)) - 1);
      const float* s = x + std::min(base, w);  // not past the end even when no lane reads
      __m512i a = _mm512_castps_si512(_mm512_maskz_loadu_ps(ma, s));
      __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(mb, s + (mb ? 16 : 0)));
      if (q != nullptr) {
        a = Quantize(_mm512_castsi512_ps(a), *q);
        b = Quantize(_mm512_castsi512_ps(b), *q);
      }
      _mm512_mask_storeu_epi32(even + i, mo, _mm512_permutex2var_epi32(a, ie, b));
      _mm512_mask_storeu_epi32(odd + i, mo, _mm512_permutex2var_epi32(a, io, b));
    }
  }
  // out[i] = sat_A(floor(x[i] * 2^F)), NaN -> 0.
  SC_TARGET static void QuantizeRow(const float* x, int64_t n, const ActQuant& q, int32_t* out) {
    const __m512 scale = _mm512_set1_ps(q.scale), hi = _mm512_set1_ps(q.hi), lo = _mm512_set1_ps(q.lo);
    const __m512i qhi = _mm512_set1_epi32(q.qhi), qlo = _mm512_set1_epi32(q.qlo);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), scale),
                                            _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      __m512i r = _mm512_cvttps_epi32(f);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, hi, _CMP_GE_OQ), qhi);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, lo, _CMP_LE_OQ), qlo);
      _mm512_storeu_si512(out + i, _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), r));
    }
    if (i < n) {  // the tail, masked (rows shorter than 16 are common: 14 x 14 images)
      const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), scale),
                                            _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      __m512i r = _mm512_cvttps_epi32(f);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, hi, _CMP_GE_OQ), qhi);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, lo, _CMP_LE_OQ), qlo);
      _mm512_mask_storeu_epi32(out + i, k, _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), r));
    }
  }
};

}  // namespace
}  // namespace mfconvert
