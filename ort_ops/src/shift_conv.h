// ShiftConv and AdderConv (docs/ops.md#shiftconv, #adderconv): the weights as the kernels read
// them, and one kernel per ISA. All give exactly the numbers of the spec.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "ort_api.h"
#include "parallel.h"
#include "shift_conv_common.h"
#include "shift_linear_pack.h"
#include "spatial_shift.h"

namespace mfconvert {

// Whether the plane layout pays for this geometry (a stride far above the kernel makes most
// of the phase planes padding): else the scalar kernel runs.
inline bool ConvPlanesPay(const ConvGeom& g) {
  const double hp = static_cast<double>(g.h + g.pt + g.pb), wp = static_cast<double>(g.w + g.pl + g.pr);
  const double planes = (hp + static_cast<double>(g.sh)) * (wp + static_cast<double>(g.sw));
  return planes <= 4.0 * hp * wp + 4096.0 && planes * static_cast<double>(g.c) < 1e10;
}

// The lookup-table path's range (ShiftConvLutPays), from bench_conv.py's layers and MobileNetV2's
// pointwise shapes (1 thread, CPU time): the direct kernel reads (C/G) * K * 512 bytes per output
// and pass, in L1 up to ~64 inputs, and its two vector µops per 16 MACs win there (16->96@112,
// 24->144@56, 32->192@28 and the 3->32 stem 1.1-2x slower through tables); from 64 inputs and 64
// outputs the tables win (64->384@14 1.3x, 96->576@14 1.7x, 160->960@7 2.6x, 192->64@14 1.4x,
// 1024->256@14 2.2-2.6x); with 32 outputs half of each 64-output group of lookups is padding
// (144->32@28 2x slower).
inline constexpr int64_t kShiftConvLutMinOut = 64;       // M
inline constexpr int64_t kShiftConvLutMinIn = 64;        // T * K * C
inline constexpr int64_t kShiftConvLutMaxIn = 1 << 16;   // T * K * C

// The custom ops (registered in register_ops.cc).
const OrtCustomOp* ShiftConvCustomOp();
const OrtCustomOp* AdderConvCustomOp();

// A SpatialShift read through (docs/ops.md#input-shift-read-through): the conv's input is
// SpatialShift(X, offsets, scale, bias) of the unshifted X, and the kernels produce each channel's
// shifted plane (the SpatialShift plane kernel of their ISA, bit for bit the op's) where they
// build their input planes, into a few planes of scratch: no shifted tensor is written.
struct ConvInputShift {
  SpatialShiftGeom g;  // of the unshifted X [N, C, H, W]; the conv's input is [N, C, g.oh, g.ow]
  const int64_t* offsets = nullptr;
  SpatialShiftPlaneFn plane = nullptr;

  // Channel c of image n of the conv's input into dst ([g.oh][g.ow] floats).
  void Plane(const float* x, int64_t n, int64_t c, float* dst) const {
    if (g.oh * g.ow == 0) return;
    plane(g, SpatialShiftPlaneOf(g, offsets, x + n * g.c * g.h * g.w, c, dst));
  }

  // Image n of the conv's input, whole, into dst ([C][g.oh][g.ow] floats): SpatialShift's own run
  // (its task split), on ISA isa.
  void Image(const float* x, int64_t n, float* dst, const Parallel& par, Isa isa) const {
    if (g.oh * g.ow == 0) return;
    SpatialShiftGeom one = g;
    one.n = 1;
    SpatialShiftRun(one, offsets, x + n * g.c * g.h * g.w, dst, par, isa);
  }
};

// Channels per scratch plane of a read-through run: the channel loop becomes at most this many
// tasks, each with its own plane (dynamically balanced on ORT's pool; 16 planes of 112 x 112 are
// 784 KiB).
inline constexpr int64_t kShiftSlots = 16;

// ShiftConv weights decoded for a channel count C/G: normalised codes (sign << 4 | m, kZeroCode
// for zero) [M][T][C/G][K], per output the rescale 2^(e_o - F) and bias.
struct PackedShiftConv {
  int64_t cg = 0, m = 0, k = 0;
  int terms = 1;
  ActQuant quant{};
  std::vector<uint8_t> codes;
  std::vector<float> scale, bias;
};

// One non-zero weight term of an output channel for the SIMD kernels: the quantised input it
// reads (offset from the group's first channel in the ConvPlanes buffer) and its shift.
struct ShiftConvEntry {
  int64_t offset;
  int32_t shift;
  int32_t unused;
};

struct ShiftConvRun {
  const PackedShiftConv* p;
  ConvGeom g;
  ConvPlanes planes;
  ConvActivation act;
  const ShiftConvEntry* entries;  // per output o: positive [begin[o], split[o]), negative [split[o], begin[o + 1])
  const int64_t* begin;
  const int64_t* split;
  const ConvInputShift* shift = nullptr;  // read through a SpatialShift (x is then its unshifted X)
};

void ShiftConvScalar(const PackedShiftConv& p, const ConvGeom& g, const ConvActivation& act,
                     const float* x, float* y, const Parallel& par);
void ShiftConvAvx2(const ShiftConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch);
void ShiftConvAvx512(const ShiftConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch);

// The lookup-table path (AVX-512, group 1): a ShiftConv is ShiftLinear over the im2col rows of its
// zero-padded input (docs/ops.md#arithmetic-shiftconv), so the ShiftLinear AVX-512 kernel (one
// vpermt2d + vpaddd per 16 MACs) computes it. The im2col columns are ordered (tap, c) — the int32
// sum does not depend on the order — so that a row of one tap is a transposed tile of the planes.
struct ShiftConvLutRun {
  const PackedShiftLinear* lin;  // in_features = T * K * C, codes [group][tap * C + c][t][64]
  ConvGeom g;
  ConvPlanes planes;             // of the float input (the kernel quantises while building tables)
  ConvActivation act;
  const int64_t* tap;            // per tap its offset in a channel's planes (ConvPlanes::TapOffset)
  const ConvInputShift* shift = nullptr;  // read through a SpatialShift (x is then its unshifted X)
};

// Whether the lookup-table path serves this layer: group 1, enough output channels to amortise a
// table over (each table of 32 entries serves M / 16 lookups), enough inputs per output that the
// direct kernel's would leave L1, and at most 2^16 of them (a strip of >= 16 im2col rows stays
// within a few MiB).
inline bool ShiftConvLutPays(const ConvGeom& g, int terms) {
  const int64_t in = g.cg * g.k * terms;  // <= 2^22 (checked before)
  return g.g == 1 && g.m >= kShiftConvLutMinOut && in >= kShiftConvLutMinIn && in <= kShiftConvLutMaxIn &&
         ConvPlanesPay(g);
}

// Lays out the codes of p (group 1) for ShiftLinearAvx512: in_features = T * K * C, lut_terms = T.
void PackShiftConvLut(const PackedShiftConv& p, PackedShiftLinear* out);
void ShiftConvLutAvx512(const ShiftConvLutRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch);

// AdderConv weights: w_q [M][C/G][K], per output the range of its w_q and the bias.
struct PackedAdderConv {
  int64_t cg = 0, m = 0, k = 0;
  ActQuant quant{};
  float unscale = 1.0f;  // 2^-F
  std::vector<int32_t> wq, wmin, wmax;
  std::vector<float> bias;
};

struct AdderConvEntry {
  int64_t offset;  // as ShiftConvEntry (one copy: x_q)
  int32_t w;       // w_q
  int32_t unused;
};

struct AdderConvRun {
  const PackedAdderConv* p;
  ConvGeom g;
  ConvPlanes planes;
  ConvActivation act;
  const AdderConvEntry* entries;  // per output o: (C/G) * K entries from o * (C/G) * K
};

void AdderConvScalar(const PackedAdderConv& p, const ConvGeom& g, const ConvActivation& act,
                     const float* x, float* y, const Parallel& par);
// false when some |x_q - w_q| may reach 2^31 (Y partly written): the caller runs the scalar kernel.
bool AdderConvAvx2(const AdderConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch);
bool AdderConvAvx512(const AdderConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch);

}  // namespace mfconvert
