// SpatialShift (docs/ops.md#spatialshift): every channel of an NCHW image moved by its own
// integer offset (Shift, Active/Sparse Shift), optionally read from another channel (AddressNet's
// channel shift), optionally followed in the same pass by a per-channel affine s_c·y + b_c and a
// clamp (the 1×1 depthwise scale conv and ReLU6 the spatial-shift pass leaves after it, fused by
// passes/fuse_spatial_shift.py). Without them Y is X's floats, copied, or padding.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "ort_api.h"
#include "parallel.h"
#include "shift_conv_common.h"

namespace mfconvert {

const OrtCustomOp* SpatialShiftCustomOp();

// One run: Y[n, c, i, j] = act(aff_c(X[n, (c - channel_shift) mod C, i*sh + dy[c], j*sw + dx[c]])),
// outside the image 0 (edge = false) or the nearest pixel (edge = true); aff_c(v) = v·scale[c]
// (if scale) + bias[c] (if bias), two float32 roundings; act(v) = min(max(v, lo), hi) with NaN
// kept (if clip). offsets is [C][2] (dy, dx).
struct SpatialShiftGeom {
  int64_t n = 0, c = 0, h = 0, w = 0, oh = 0, ow = 0, sh = 1, sw = 1, channel_shift = 0;
  bool edge = false;
  const float* scale = nullptr;  // [C] or null
  const float* bias = nullptr;   // [C] or null
  bool clip = false;
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  int64_t lane_rows = 0, lane_cols = 0;  // 16 = lane_rows * ow + lane_cols (the AVX-512 small-plane paths)
};

// One output plane's arguments: its input plane, offsets clamped (Clamp in spatial_shift_op.cc),
// its scale and bias (used where the geometry has them).
struct ShiftPlane {
  const float* x;
  float* y;
  int64_t dy, dx;
  float s, b;
};

// The elementwise tail in float32, in the documented order (spatial_shift_op.cc and the SIMD
// paths use the same order; -ffp-contract=off keeps v·s + b two roundings).
inline float ShiftAffine(const SpatialShiftGeom& g, const ShiftPlane& p, float v) {
  if (g.scale) v = v * p.s;
  if (g.bias) v = v + p.b;
  if (g.clip) {
    v = v < g.lo ? g.lo : v;  // NaN compares false: kept
    v = v > g.hi ? g.hi : v;
  }
  return v;
}

// One output plane, per ISA (bit-identical results; spatial_shift_avx512.cc, _avx2.cc, _op.cc).
void SpatialShiftPlaneScalar(const SpatialShiftGeom& g, const ShiftPlane& p);
void SpatialShiftPlaneAvx2(const SpatialShiftGeom& g, const ShiftPlane& p);
void SpatialShiftPlaneAvx512(const SpatialShiftGeom& g, const ShiftPlane& p);

void SpatialShiftRun(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y,
                     const Parallel& par, Isa isa);

using SpatialShiftPlaneFn = void (*)(const SpatialShiftGeom&, const ShiftPlane&);

// The plane kernel of an ISA (all bit-identical).
SpatialShiftPlaneFn SpatialShiftPlaneKernel(Isa isa);

// The arguments of output plane c of one image: xn is the image's first input channel ([C][H][W]),
// y the output plane ([OH][OW]); the channel shift applied and the offsets clamped.
ShiftPlane SpatialShiftPlaneOf(const SpatialShiftGeom& g, const int64_t* offsets, const float* xn, int64_t c, float* y);

// SpatialShift's attributes (docs/ops.md#spatialshift) read and checked once, each named
// `prefix` + its name: "" for the SpatialShift op, "shift_" for a ShiftConv reading through a
// shift (docs/ops.md#input-shift-read-through). Errors are ConvError naming the attribute.
struct SpatialShiftAttrs {
  int64_t sh = 1, sw = 1, channel_shift = 0;
  bool edge = false, clip = false;
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  bool any_present = false;  // whether the node gave any of them

  void Read(const OrtKernelInfo* info, const std::string& prefix);
};

// One run's geometry for X of shape x_shape, with the offsets, scale and bias inputs at
// first_input, first_input + 1, first_input + 2 of ctx (scale and bias optional), each checked
// and named `prefix` + offsets/scale/bias; *offsets gets the offsets' data. ConvError on a bad
// shape, type or size (X's size and Y's plane are within int64).
SpatialShiftGeom SpatialShiftMakeGeom(const SpatialShiftAttrs& a, const std::vector<int64_t>& x_shape,
                                      Ort::KernelContext& ctx, size_t first_input, const std::string& prefix,
                                      const int64_t** offsets);

}  // namespace mfconvert
