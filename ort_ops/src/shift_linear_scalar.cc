// Portable ShiftLinear: the spec's formula, one row and one output at a time.
#include <cmath>
#include <vector>

#include "shift_linear_kernels.h"

namespace mfconvert {

namespace {

inline int32_t Quantize(float x, const ActQuant& q) {
  const float f = std::floor(x * q.scale);
  if (std::isnan(f)) return 0;
  if (f >= q.hi) return q.qhi;
  if (f <= q.lo) return q.qlo;
  return static_cast<int32_t>(f);
}

void Rows(const PackedShiftLinear& p, const float* x, int64_t row0, int64_t row1, float* y) {
  const int64_t in = p.attrs.in_features, out = p.attrs.out_features;
  std::vector<int32_t> xq(static_cast<size_t>(in));
  for (int64_t r = row0; r < row1; ++r) {
    for (int64_t i = 0; i < in; ++i) xq[i] = Quantize(x[r * in + i], p.quant);
    for (int64_t o = 0; o < out; ++o) {
      const uint8_t* c = p.codes.data() + o * in;
      uint32_t acc = 0;  // int32 arithmetic with wrap-around
      for (int64_t i = 0; i < in; ++i) {
        if (c[i] == kZeroCode) continue;
        const uint32_t t = static_cast<uint32_t>(xq[i] >> (c[i] & 15));
        acc += (c[i] >> 4) ? 0u - t : t;
      }
      const float f = static_cast<float>(static_cast<int32_t>(acc));
      y[r * out + o] = f * p.scale[o] + p.bias[o];
    }
  }
}

}  // namespace

void ShiftLinearScalar(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                       const Parallel& par) {
  constexpr int64_t kRowsPerTask = 4;
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  par.For(static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask;
    Rows(p, x, r0, std::min(rows, r0 + kRowsPerTask), y);
  });
}

}  // namespace mfconvert
