// SpatialShift's plane kernel with AVX-512 (docs/ops.md#spatialshift): one vector of 16 output
// columns at a time, the in-image lanes loaded (expand loads where the first lanes are padding,
// so no address before the row is formed), the padding lanes 0.0 or the edge pixel, then the
// optional s·v + b and clamp, and a masked store. A 7-wide row is one vector. Strides 1 and 2;
// other strides take the scalar plane. Bit-identical with the scalar path: the same float32
// multiply, add and (NaN-keeping) clamp per element.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "spatial_shift.h"
#include "spatial_shift_rows.h"

#define SS_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define SS_INLINE SS_TARGET __attribute__((always_inline)) static inline

namespace mfconvert {
namespace {

using spatial_shift_detail::Rows;

// Lane bits [a, e), 0 <= a <= e <= 16.
SS_INLINE __mmask16 Lanes(int64_t a, int64_t e) {
  return static_cast<__mmask16>(((1u << e) - 1u) & ~((1u << a) - 1u));
}

// Lanes [a, e) of output columns j.. read xr[(j + l) * SW + dx]; the others 0.0.
template <int SW>
SS_INLINE __m512 Load(const float* xr, int64_t w, int64_t j, int64_t dx, int64_t a, int64_t e) {
  if (e <= a) return _mm512_setzero_ps();
  if (SW == 1) {
    if (a == 0 && e == 16) return _mm512_loadu_ps(xr + j + dx);
    return _mm512_maskz_expandloadu_ps(Lanes(a, e), xr + j + a + dx);
  }
  // SW == 2: a window of 32 inputs k = 0..31 at xr[2j + dx + k], its even lanes kept
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const int64_t base = 2 * j + dx;
  if (a == 0 && e == 16 && base + 31 < w)
    return _mm512_permutex2var_ps(_mm512_loadu_ps(xr + base), even, _mm512_loadu_ps(xr + base + 16));
  const int64_t k0 = 2 * a, k1 = 2 * e - 1;  // the window's lanes in the image: [k0, k1)
  __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
  if (k0 < 16) low = _mm512_maskz_expandloadu_ps(Lanes(k0, std::min<int64_t>(k1, 16)), xr + base + k0);
  if (k1 > 16) {
    const int64_t h0 = std::max<int64_t>(k0, 16);
    high = _mm512_maskz_expandloadu_ps(Lanes(h0 - 16, k1 - 16), xr + base + h0);
  }
  return _mm512_permutex2var_ps(low, even, high);
}

template <bool S, bool B, bool C>
SS_INLINE __m512 Tail(__m512 v, __m512 s, __m512 b, __m512 lo, __m512 hi) {
  if (S) v = _mm512_mul_ps(v, s);
  if (B) v = _mm512_add_ps(v, b);
  if (C) {
    v = _mm512_max_ps(lo, v);  // lo > v ? lo : v; a NaN v is returned (the second operand)
    v = _mm512_min_ps(hi, v);  // hi < v ? hi : v
  }
  return v;
}

template <int SW, bool S, bool B, bool C>
SS_TARGET void Plane(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const __m512 s = _mm512_set1_ps(p.s), b = _mm512_set1_ps(p.b), lo = _mm512_set1_ps(g.lo), hi = _mm512_set1_ps(g.hi);
  const int64_t ow = g.ow, w = g.w, dx = p.dx;
  const bool edge = g.edge;
  Rows(g, p, [&](float* yr, const float* xr, int64_t j0, int64_t j1, float) SS_TARGET {
    for (int64_t j = 0; j < ow; j += 16) {
      const int64_t n = std::min<int64_t>(16, ow - j);
      const int64_t a = std::min(std::max<int64_t>(j0 - j, 0), n), e = std::min(std::max(j1 - j, a), n);
      __m512 v = Load<SW>(xr, w, j, dx, a, e);
      if (edge) {
        if (a > 0) v = _mm512_mask_blend_ps(Lanes(0, a), v, _mm512_set1_ps(xr[0]));
        if (e < n) v = _mm512_mask_blend_ps(Lanes(e, n), v, _mm512_set1_ps(xr[w - 1]));
      }
      v = Tail<S, B, C>(v, s, b, lo, hi);
      if (n == 16)
        _mm512_storeu_ps(yr + j, v);
      else
        _mm512_mask_storeu_ps(yr + j, Lanes(0, n), v);
    }
  });
}

template <int SW>
void Dispatch(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const int k = (g.scale ? 4 : 0) | (g.bias ? 2 : 0) | (g.clip ? 1 : 0);
  switch (k) {
    case 0: return Plane<SW, false, false, false>(g, p);
    case 1: return Plane<SW, false, false, true>(g, p);
    case 2: return Plane<SW, false, true, false>(g, p);
    case 3: return Plane<SW, false, true, true>(g, p);
    case 4: return Plane<SW, true, false, false>(g, p);
    case 5: return Plane<SW, true, false, true>(g, p);
    case 6: return Plane<SW, true, true, false>(g, p);
    default: return Plane<SW, true, true, true>(g, p);
  }
}

}  // namespace

void SpatialShiftPlaneAvx512(const SpatialShiftGeom& g, const ShiftPlane& p) {
  if (g.sw == 1) return Dispatch<1>(g, p);
  if (g.sw == 2) return Dispatch<2>(g, p);
  SpatialShiftPlaneScalar(g, p);
}

}  // namespace mfconvert
