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
using spatial_shift_detail::WithTail;

// Lane bits [a, e), 0 <= a <= e <= 16.
SS_INLINE __mmask16 Lanes(int64_t a, int64_t e) {
  return static_cast<__mmask16>(((1u << e) - 1u) & ~((1u << a) - 1u));
}

// Stores the first n (1..16) lanes of v at y: a full vector, or a masked store that touches
// nothing past y + n.
SS_INLINE void StoreFirst(float* y, int64_t n, __m512 v) {
  if (n == 16)
    _mm512_storeu_ps(y, v);
  else
    _mm512_mask_storeu_ps(y, Lanes(0, n), v);
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
      StoreFirst(yr + j, n, v);
    }
  });
}

// Stride 1, zeros padding, a plane of up to kFlat floats (MobileNetV2's 7×7, 14×14, 28×28): the
// output plane is the input plane read at the flat offset dy·W + dx, so it goes 16 floats at a
// time across rows; a lane reads only where its row i + dy and column j + dx are in the image
// (its column j = k mod W kept per lane from vector to vector), else it is 0.0. The masked-off
// lanes' addresses are never accessed (AVX-512 masked loads do not fault there); the address is
// formed as an integer so that no pointer outside the plane exists either.
constexpr int64_t kFlat = 1024;

template <bool S, bool B, bool C>
SS_TARGET void Flat(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const __m512 s = _mm512_set1_ps(p.s), b = _mm512_set1_ps(p.b), lo = _mm512_set1_ps(g.lo), hi = _mm512_set1_ps(g.hi);
  const int64_t h = g.h, w = g.w, size = h * w, dy = p.dy, dx = p.dx;
  // rows of the output whose input row is inside: [r0, r1); as flat output indices [k0, k1)
  const int64_t r0 = std::min(std::max<int64_t>(-dy, 0), h), r1 = std::min(std::max(h - dy, r0), h);
  const int64_t k_lo = r0 * w, k_hi = r1 * w;
  const __m512i col_lo = _mm512_set1_epi32(static_cast<int32_t>(std::min(std::max<int64_t>(-dx, 0), w)));
  const __m512i col_hi = _mm512_set1_epi32(static_cast<int32_t>(std::min(std::max<int64_t>(w - dx, 0), w)));
  const __m512i width = _mm512_set1_epi32(static_cast<int32_t>(w));
  const __m512i step = _mm512_set1_epi32(static_cast<int32_t>(16 % w));
  __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (__mmask16 over; (over = _mm512_cmpge_epi32_mask(col, width)) != 0;)   // each lane's column j = k mod W
    col = _mm512_mask_sub_epi32(col, over, col, width);
  const uintptr_t base = reinterpret_cast<uintptr_t>(p.x) + static_cast<uintptr_t>((dy * w + dx) * 4);
  for (int64_t k = 0; k < size; k += 16) {
    const int64_t n = std::min<int64_t>(16, size - k);
    const int64_t a = std::min(std::max<int64_t>(k_lo - k, 0), n), e = std::min(std::max(k_hi - k, a), n);
    const __mmask16 rows = Lanes(a, e);
    const __mmask16 cols = _mm512_cmpge_epi32_mask(col, col_lo) & _mm512_cmplt_epi32_mask(col, col_hi);
    const __m512 v = _mm512_maskz_loadu_ps(rows & cols, reinterpret_cast<const float*>(base + static_cast<uintptr_t>(k * 4)));
    const __m512 y = Tail<S, B, C>(v, s, b, lo, hi);
    StoreFirst(p.y + k, n, y);
    col = _mm512_add_epi32(col, step);
    col = _mm512_mask_sub_epi32(col, _mm512_cmpge_epi32_mask(col, width), col, width);
  }
}

// Strided, zeros padding, an input plane of up to kFlat floats (MobileNetV2's stride-2 layers to
// 14×14 → 7×7): 16 outputs at a time across rows, each lane's (i, j) kept from vector to vector
// (16 = rows·OW + cols: g.lane_rows, g.lane_cols), read by a masked gather at
// (i·sh + dy)·W + j·sw + dx where that is inside the image (no access elsewhere), else 0.0.
template <bool S, bool B, bool C>
SS_TARGET void FlatStrided(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const __m512 s = _mm512_set1_ps(p.s), b = _mm512_set1_ps(p.b), lo = _mm512_set1_ps(g.lo), hi = _mm512_set1_ps(g.hi);
  const int64_t size = g.oh * g.ow;
  const __m512i ow = _mm512_set1_epi32(static_cast<int32_t>(g.ow)), h = _mm512_set1_epi32(static_cast<int32_t>(g.h));
  const __m512i w = _mm512_set1_epi32(static_cast<int32_t>(g.w)), one = _mm512_set1_epi32(1);
  const __m512i sh = _mm512_set1_epi32(static_cast<int32_t>(g.sh)), sw = _mm512_set1_epi32(static_cast<int32_t>(g.sw));
  const __m512i dy = _mm512_set1_epi32(static_cast<int32_t>(p.dy)), dx = _mm512_set1_epi32(static_cast<int32_t>(p.dx));
  const __m512i step_i = _mm512_set1_epi32(static_cast<int32_t>(g.lane_rows));
  const __m512i step_j = _mm512_set1_epi32(static_cast<int32_t>(g.lane_cols));
  const __m512i zero = _mm512_setzero_si512();
  __m512i j = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), i = zero;
  for (__mmask16 over; (over = _mm512_cmpge_epi32_mask(j, ow)) != 0;) {
    j = _mm512_mask_sub_epi32(j, over, j, ow);
    i = _mm512_mask_add_epi32(i, over, i, one);
  }
  for (int64_t k = 0; k < size; k += 16) {
    const int64_t n = std::min<int64_t>(16, size - k);
    const __m512i r = _mm512_add_epi32(_mm512_mullo_epi32(i, sh), dy), q = _mm512_add_epi32(_mm512_mullo_epi32(j, sw), dx);
    const __mmask16 in = Lanes(0, n) & _mm512_cmpge_epi32_mask(r, zero) & _mm512_cmplt_epi32_mask(r, h) &
                         _mm512_cmpge_epi32_mask(q, zero) & _mm512_cmplt_epi32_mask(q, w);
    const __m512i index = _mm512_add_epi32(_mm512_mullo_epi32(r, w), q);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, index, p.x, 4);
    const __m512 y = Tail<S, B, C>(v, s, b, lo, hi);
    StoreFirst(p.y + k, n, y);
    i = _mm512_add_epi32(i, step_i);
    j = _mm512_add_epi32(j, step_j);
    const __mmask16 wrap = _mm512_cmpge_epi32_mask(j, ow);
    j = _mm512_mask_sub_epi32(j, wrap, j, ow);
    i = _mm512_mask_add_epi32(i, wrap, i, one);
  }
}

template <int SW>
void Dispatch(const SpatialShiftGeom& g, const ShiftPlane& p) {
  if (!g.edge && g.h * g.w <= kFlat && (SW != 1 || g.sh != 1)) {
    return WithTail(g, [&](auto s, auto b, auto c) {
      FlatStrided<decltype(s)::value, decltype(b)::value, decltype(c)::value>(g, p);
    });
  }
  if (SW == 1 && g.sh == 1 && !g.edge && g.h * g.w <= kFlat) {
    return WithTail(g, [&](auto s, auto b, auto c) {
      Flat<decltype(s)::value, decltype(b)::value, decltype(c)::value>(g, p);
    });
  }
  WithTail(g, [&](auto s, auto b, auto c) {
    Plane<SW, decltype(s)::value, decltype(b)::value, decltype(c)::value>(g, p);
  });
}

}  // namespace

void SpatialShiftPlaneAvx512(const SpatialShiftGeom& g, const ShiftPlane& p) {
  if (g.sw == 1) return Dispatch<1>(g, p);
  if (g.sw == 2 || (!g.edge && g.h * g.w <= kFlat)) return Dispatch<2>(g, p);   // any stride: the gather
  SpatialShiftPlaneScalar(g, p);
}

}  // namespace mfconvert
