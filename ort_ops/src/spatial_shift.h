// SpatialShift (docs/ops.md#spatialshift): every channel of an NCHW image moved by its own
// integer offset (Shift, Active/Sparse Shift), optionally read from another channel (AddressNet's
// channel shift). It only moves memory: Y is X's floats, copied or padding.
#pragma once

#include <cstdint>

#include "ort_api.h"
#include "parallel.h"

namespace mfconvert {

const OrtCustomOp* SpatialShiftCustomOp();

// One run: Y[n, c, i, j] = X[n, (c - channel_shift) mod C, i*sh + dy[c], j*sw + dx[c]], outside
// the image 0 (edge = false) or the nearest pixel (edge = true). offsets is [C][2] (dy, dx).
struct SpatialShiftGeom {
  int64_t n = 0, c = 0, h = 0, w = 0, oh = 0, ow = 0, sh = 1, sw = 1, channel_shift = 0;
  bool edge = false;
};

void SpatialShiftRun(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y,
                     const Parallel& par);

}  // namespace mfconvert
