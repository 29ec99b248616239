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
using spatial_shift_detail::WithTail;

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

// Zero padding on an input plane of up to kFlat floats: 8 outputs at a time across rows, as the
// AVX-512 kernel does (spatial_shift_avx512.cc): each lane's output row i and column j stepped
// from vector to vector (8 = rows·OW + cols), read where (i·sh + dy, j·sw + dx) is inside the
// image — at stride 1 by a masked load at the flat offset dy·W + dx (masked-off lanes are not
// accessed; the address is formed as an integer), strided by a masked gather — else 0.0.
constexpr int64_t kFlat = 1024;

SS_INLINE __m256i Between(__m256i v, __m256i lo, __m256i hi) {   // lo <= v < hi, per lane (all ones)
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, v), _mm256_cmpgt_epi32(hi, v));
}

template <bool STRIDED, bool S, bool B, bool C>
SS_TARGET void Flat(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const __m256 s = _mm256_set1_ps(p.s), b = _mm256_set1_ps(p.b), lo = _mm256_set1_ps(g.lo), hi = _mm256_set1_ps(g.hi);
  const int64_t size = g.oh * g.ow;
  const __m256i ow = _mm256_set1_epi32(static_cast<int32_t>(g.ow)), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i h = _mm256_set1_epi32(static_cast<int32_t>(g.h)), w = _mm256_set1_epi32(static_cast<int32_t>(g.w));
  const __m256i sh = _mm256_set1_epi32(static_cast<int32_t>(g.sh)), sw = _mm256_set1_epi32(static_cast<int32_t>(g.sw));
  const __m256i dy = _mm256_set1_epi32(static_cast<int32_t>(p.dy)), dx = _mm256_set1_epi32(static_cast<int32_t>(p.dx));
  const __m256i step_i = _mm256_set1_epi32(static_cast<int32_t>(8 / g.ow)), step_j = _mm256_set1_epi32(static_cast<int32_t>(8 % g.ow));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i j = lane, i = zero;
  for (;;) {   // each lane's (i, j) for k = lane
    const __m256i over = _mm256_cmpgt_epi32(ow, j) ^ _mm256_set1_epi32(-1);   // j >= OW
    if (_mm256_testz_si256(over, over)) break;
    j = _mm256_sub_epi32(j, _mm256_and_si256(over, ow));
    i = _mm256_add_epi32(i, _mm256_and_si256(over, one));
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(p.x) + static_cast<uintptr_t>((p.dy * g.w + p.dx) * 4);
  for (int64_t k = 0; k < size; k += 8) {
    const int64_t n = std::min<int64_t>(8, size - k);
    const __m256i r = _mm256_add_epi32(STRIDED ? _mm256_mullo_epi32(i, sh) : i, dy);
    const __m256i q = _mm256_add_epi32(STRIDED ? _mm256_mullo_epi32(j, sw) : j, dx);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), lane);
    const __m256i in = _mm256_and_si256(live, _mm256_and_si256(Between(r, zero, h), Between(q, zero, w)));
    __m256 v;
    if (STRIDED)
      v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p.x, _mm256_add_epi32(_mm256_mullo_epi32(r, w), q),
                                   _mm256_castsi256_ps(in), 4);
    else
      v = _mm256_maskload_ps(reinterpret_cast<const float*>(base + static_cast<uintptr_t>(k * 4)), in);
    const __m256 y = Tail<S, B, C>(v, s, b, lo, hi);
    if (n == 8)
      _mm256_storeu_ps(p.y + k, y);
    else
      _mm256_maskstore_ps(p.y + k, live, y);
    i = _mm256_add_epi32(i, step_i);
    j = _mm256_add_epi32(j, step_j);
    const __m256i wrap = _mm256_cmpgt_epi32(ow, j) ^ _mm256_set1_epi32(-1);
    j = _mm256_sub_epi32(j, _mm256_and_si256(wrap, ow));
    i = _mm256_add_epi32(i, _mm256_and_si256(wrap, one));
  }
}

template <bool STRIDED>
void FlatDispatch(const SpatialShiftGeom& g, const ShiftPlane& p) {
  WithTail(g, [&](auto s, auto b, auto c) {
    Flat<STRIDED, decltype(s)::value, decltype(b)::value, decltype(c)::value>(g, p);
  });
}

template <int SW>
void Dispatch(const SpatialShiftGeom& g, const ShiftPlane& p) {
  // stride 1: rows of 16 or more floats go faster row by row (measured at 28 wide)
  if (!g.edge && g.h * g.w <= kFlat && (g.sh != 1 || g.sw != 1 || g.w < 16))
    return g.sh == 1 && g.sw == 1 ? FlatDispatch<false>(g, p) : FlatDispatch<true>(g, p);
  WithTail(g, [&](auto s, auto b, auto c) {
    Plane<SW, decltype(s)::value, decltype(b)::value, decltype(c)::value>(g, p);
  });
}

}  // namespace

void SpatialShiftPlaneAvx2(const SpatialShiftGeom& g, const ShiftPlane& p) {
  if (g.sw == 1) return Dispatch<1>(g, p);
  if (g.sw == 2 || (!g.edge && g.h * g.w <= kFlat)) return Dispatch<2>(g, p);   // any stride: the gather
  SpatialShiftPlaneScalar(g, p);
}

}  // namespace mfconvert
