// The ShiftLinear compute kernels, one per ISA: Y[rows][out] from X[rows][in] and weights
// packed for that ISA. All give exactly the numbers of docs/ops.md#arithmetic.
#pragma once

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "shift_linear_pack.h"

namespace mfconvert {

// `scratch`: the calling kernel's buffer for this Compute (bounded: a few MiB at any size).
// x has p.attrs.in_features columns (X widened by WidenRows) except for AVX-512, which reads X
// as it is: in_features / p.lut_terms columns.
void ShiftLinearScalar(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                       const Parallel& par);
void ShiftLinearAvx2(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                     const Parallel& par, AlignedBuffer& scratch);
void ShiftLinearAvx512(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                       const Parallel& par, AlignedBuffer& scratch);

// Planning of the token-vectorised kernel (AVX2).
namespace token_plan {

// Bytes of one block's activation buffer: per input of a chunk the x_q and ~x_q rows, then a
// zero row.
inline int64_t BlockBytes(int64_t in) { return std::min(in, kInChunk) * kInputBytes + kRowBytes; }

// Blocks quantised per pass, so the activation buffer stays below ~8 MiB.
inline int64_t BlocksPerPass(int64_t in) {
  return std::max<int64_t>(1, (int64_t{8} << 20) / BlockBytes(in));
}

// Output tiles per task: about 2^19 MACs per task, so tasks balance over threads.
inline int64_t TilesPerTask(int64_t in, int64_t tiles) {
  const int64_t per_tile = int64_t{kTileOut} * kBlockTokens * in;
  return std::clamp<int64_t>((int64_t{1} << 19) / per_tile, 1, tiles);
}

}  // namespace token_plan

}  // namespace mfconvert
