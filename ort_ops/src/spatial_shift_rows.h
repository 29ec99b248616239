// What every SpatialShift plane kernel shares (scalar, AVX2, AVX-512): the in-image column range
// of an output row and the row loop; each ISA supplies the row body.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "spatial_shift.h"

namespace mfconvert {
namespace spatial_shift_detail {

// Output columns [j0, j1) read inside the row: 0 <= j * sw + dx < W (dx already clamped).
inline void Columns(const SpatialShiftGeom& g, int64_t dx, int64_t* j0, int64_t* j1) {
  *j0 = dx >= 0 ? 0 : std::min(g.ow, (-dx + g.sw - 1) / g.sw);
  *j1 = std::max(*j0, std::min(g.ow, g.w - dx <= 0 ? 0 : (g.w - dx - 1) / g.sw + 1));
}

// The fused tail's flags of g (scale, bias, clip) as compile-time constants: calls
// f(std::bool_constant<S>, std::bool_constant<B>, std::bool_constant<C>), so each ISA's kernels
// are instantiated once per tail and the per-element branches are resolved at compile time.
template <class F>
inline void WithTail(const SpatialShiftGeom& g, const F& f) {
  using T = std::true_type;
  using N = std::false_type;
  switch ((g.scale ? 4 : 0) | (g.bias ? 2 : 0) | (g.clip ? 1 : 0)) {
    case 0: return f(N{}, N{}, N{});
    case 1: return f(N{}, N{}, T{});
    case 2: return f(N{}, T{}, N{});
    case 3: return f(N{}, T{}, T{});
    case 4: return f(T{}, N{}, N{});
    case 5: return f(T{}, N{}, T{});
    case 6: return f(T{}, T{}, N{});
    default: return f(T{}, T{}, T{});
  }
}

// The plane's rows: a row outside the image is `zero` (zeros padding; the affine and clamp of
// 0.0) or reads the nearest image row (edge); every other row calls row(yr, xr, j0, j1).
template <class Row>
inline void Rows(const SpatialShiftGeom& g, const ShiftPlane& p, const Row& row) {
  int64_t j0 = 0, j1 = 0;
  Columns(g, p.dx, &j0, &j1);
  const float zero = ShiftAffine(g, p, 0.0f);
  for (int64_t i = 0; i < g.oh; ++i) {
    float* yr = p.y + i * g.ow;
    int64_t r = i * g.sh + p.dy;
    if (r < 0 || r >= g.h) {
      if (!g.edge) {
        std::fill(yr, yr + g.ow, zero);
        continue;
      }
      r = std::min(std::max(r, int64_t{0}), g.h - 1);
    }
    row(yr, p.x + r * g.w, j0, j1, zero);
  }
}

}  // namespace spatial_shift_detail
}  // namespace mfconvert
