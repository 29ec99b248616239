// SpatialShift's plane kernel with AVX2 (docs/ops.md#spatialshift): per output row the padding
// columns filled with their value, the in-image columns 8 at a time (stride 1: one load; stride
// 2: two loads and a shuffle of the even floats), then the optional s·v + b and clamp; the last
// columns of a segment one at a time (ShiftAffine). Other strides take the scalar plane.
// Bit-identical with the scalar path: the same float32 multiply, add and NaN-keeping clamp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "spatial_shift.h"
#include "spatial_shift_rows.h"

#define SS_TARGET __attribute__((target("avx2")))
#define SS_INLINE SS_TARGET __attribute__((always_inline)) static inline

namespace mfconvert {
namespace {

using spatial_shift_detail::Rows;

template <bool S, bool B, bool C>
SS_INLINE __m256 Tail(__m256 v, __m256 s, __m256 b, __m256 lo, __m256 hi) {
  if (S) v = _mm256_mul_ps(v, s);
  if (B) v = _mm256_add_ps(v, b);
  if (C) {
    v = _mm256_max_ps(lo, v);  // lo > v ? lo : v; a NaN v is returned (the second operand)
    v = _mm256_min_ps(hi, v);  // hi < v ? hi : v
  }
  return v;
}

template <int SW, bool S, bool B, bool C>
SS_TARGET void Plane(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const __m256 s = _mm256_set1_ps(p.s), b = _mm256_set1_ps(p.b), lo = _mm256_set1_ps(g.lo), hi = _mm256_set1_ps(g.hi);
  const int64_t ow = g.ow, w = g.w, dx = p.dx;
  const bool edge = g.edge;
  Rows(g, p, [&](float* yr, const float* xr, int64_t j0, int64_t j1, float zero) SS_TARGET {
    std::fill(yr, yr + j0, edge ? ShiftAffine(g, p, xr[0]) : zero);
    int64_t j = j0;
    if (SW == 1) {
      for (; j + 8 <= j1; j += 8) _mm256_storeu_ps(yr + j, Tail<S, B, C>(_mm256_loadu_ps(xr + j + dx), s, b, lo, hi));
    } else {   // the 16 inputs 2j + dx .. 2j + dx + 15 inside the row
      for (; j + 8 <= j1 && 2 * j + dx + 15 < w; j += 8) {
        const __m256 a = _mm256_loadu_ps(xr + 2 * j + dx), c = _mm256_loadu_ps(xr + 2 * j + dx + 8);
        const __m256 even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, c, 0x88)), 0xD8));
        _mm256_storeu_ps(yr + j, Tail<S, B, C>(even, s, b, lo, hi));
      }
    }
    for (; j < j1; ++j) yr[j] = ShiftAffine(g, p, xr[j * SW + dx]);
    std::fill(yr + j1, yr + ow, edge ? ShiftAffine(g, p, xr[w - 1]) : zero);
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

void SpatialShiftPlaneAvx2(const SpatialShiftGeom& g, const ShiftPlane& p) {
  if (g.sw == 1) return Dispatch<1>(g, p);
  if (g.sw == 2) return Dispatch<2>(g, p);
  SpatialShiftPlaneScalar(g, p);
}

}  // namespace mfconvert
