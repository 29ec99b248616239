// The SIMD ShiftConv and AdderConv kernels, written once over an ISA traits class S (lanes and
// intrinsics: shift_conv_simd_avx2.h, shift_conv_simd_avx512.h). Included by one .cc per op and
// ISA after defining SC_TARGET (that ISA's target attribute); everything here has internal
// linkage, so no code compiled for one ISA is shared with another translation unit.
//
// Layout (ConvPlanes): the quantised image of one batch item, per channel the zero-padded image
// split into stride-phase planes, so that for a tap the inputs of consecutive flat output indices
// f = oh * Wq + ow are consecutive int32 — across output rows too. A kernel computes V vectors of
// flat outputs at a time for one output channel, walking that channel's list of weights:
//   ShiftConv: acc += (x >> m)  [load, vpsravd, vpaddd per S::kLanes MACs; the positive weights
//              first, then the negative ones with vpsubd: -(x >> m) summed, int32 wrap-around]
//   AdderConv: acc += |x - w|   [load, vpsubd, vpabsd, vpaddd], in int32 over chunks of weights
//              whose bound max|x_q - w_q| * chunk stays below 2^31, each chunk carried into int64.
// Columns ow >= OW of the flat grid are computed and dropped (at most (k - 1) d / s per row).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "shift_conv.h"

#ifndef SC_TARGET
#error "define SC_TARGET before including shift_conv_simd.h"
#endif

namespace mfconvert {
namespace {

constexpr int64_t kOutBlock = 16;    // output channels per task

// Quantises channel c of image xc ([H][W] floats) into its planes (q null: copies the float bits
// instead, 0.0f at padding, for the lookup-table path). With `range`, *lo and *hi get the range of
// the quantised values, 0 included. tmp: Wq * sw + S::kLanes int32 (sw > 2 only).
template <class S>
SC_TARGET void BuildChannel(const float* xc, const ConvGeom& g, const ConvPlanes& pl, const ActQuant* q,
                            int32_t* dst, int32_t* tmp, bool range, int32_t* lo, int32_t* hi) {
  const int64_t row_len = pl.wq * g.sw;
  int32_t mn = 0, mx = 0;
  for (int64_t r = 0; r < pl.hq * g.sh; ++r) {
    const int64_t ph = r % g.sh, rq = r / g.sh, ih = r - g.pt;
    if (g.sw == 2) {  // the common stride: quantised and split into its two phase rows at once
      int32_t* even = dst + ph * 2 * pl.plane + rq * pl.wq;
      if (ih < 0 || ih >= g.h) {
        std::memset(even, 0, static_cast<size_t>(pl.wq) * 4);
        std::memset(even + pl.plane, 0, static_cast<size_t>(pl.wq) * 4);
        continue;
      }
      S::QuantizeSplit2(xc + ih * g.w, g.w, g.pl, pl.wq, q, even, even + pl.plane);
      if (range) {
        for (const int32_t* v : {even, even + pl.plane})
          for (int64_t i = 0; i < pl.wq; ++i) {
            mn = v[i] < mn ? v[i] : mn;
            mx = v[i] > mx ? v[i] : mx;
          }
      }
      continue;
    }
    // sw = 1: the padded row is the plane row; else it is built in tmp and split by phase.
    int32_t* row = g.sw == 1 ? dst + ph * pl.plane + rq * pl.wq : tmp;
    if (ih < 0 || ih >= g.h) {
      std::memset(row, 0, static_cast<size_t>(row_len) * 4);
    } else {
      std::memset(row, 0, static_cast<size_t>(g.pl) * 4);
      if (q != nullptr) {
        S::QuantizeRow(xc + ih * g.w, g.w, *q, row + g.pl);
      } else {
        std::memcpy(row + g.pl, xc + ih * g.w, static_cast<size_t>(g.w) * 4);
      }
      std::memset(row + g.pl + g.w, 0, static_cast<size_t>(row_len - g.pl - g.w) * 4);
      if (range) {
        const int32_t* v = row + g.pl;
        for (int64_t i = 0; i < g.w; ++i) {
          mn = v[i] < mn ? v[i] : mn;
          mx = v[i] > mx ? v[i] : mx;
        }
      }
    }
    if (g.sw == 1) continue;
    int32_t* out = dst + ph * g.sw * pl.plane + rq * pl.wq;
    for (int64_t pw = 0; pw < g.sw; ++pw, out += pl.plane)
      for (int64_t i = 0; i < pl.wq; ++i) out[i] = tmp[i * g.sw + pw];
  }
  *lo = mn;
  *hi = mx;
}

// Stores the n outputs of flat indices [f, f + n) from res into channel plane yo ([OH][OW]):
// the columns ow < OW of each output row, one copy per row.
inline void Scatter(const float* res, int64_t f, int64_t n, const ConvGeom& g, int64_t wq, float* yo) {
  if (wq == g.ow) {
    std::memcpy(yo + f, res, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t oh = f / wq; oh * wq < f + n; ++oh) {
    const int64_t a = std::max<int64_t>(f, oh * wq), b = std::min<int64_t>(f + n, oh * wq + g.ow);
    if (a < b) std::memcpy(yo + oh * g.ow + (a - oh * wq), res + (a - f), static_cast<size_t>(b - a) * 4);
  }
}

// ShiftConv: outputs [o0, o1) x flat indices [f0, f1) of one image.
template <class S, int V = S::kVectors>
SC_TARGET void ShiftTask(const ShiftConvRun& r, const int32_t* buf, float* yn, int64_t o0, int64_t o1,
                         int64_t f0, int64_t f1) {
  using I = typename S::I;
  constexpr int L = S::kLanes;
  const PackedShiftConv& p = *r.p;
  const ConvGeom& g = r.g;
  const auto lo = S::Set1F(r.act.lo), hi = S::Set1F(r.act.hi);
  alignas(64) float res[V * L];
  // Flat outputs outer, output channels inner: the input rows of one span of flat outputs (all
  // channels of the group) stay in L2 while every output of the block reads them.
  for (int64_t f = f0; f < f1; f += V * L) {
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t* src = buf + o / g.mg * g.cg * r.planes.channel + f;
      const ShiftConvEntry* e0 = r.entries + r.begin[o];
      const ShiftConvEntry* en = r.entries + r.split[o];
      const ShiftConvEntry* e1 = r.entries + r.begin[o + 1];
      const auto scale = S::Set1F(p.scale[o]), bias = S::Set1F(p.bias[o]);
      I acc[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[v] = S::Zero();
      for (const ShiftConvEntry* e = e0; e < en; ++e) {       // positive weights: acc += x >> m
        const I cnt = S::Set1(e->shift);
        const int32_t* s = src + e->offset;
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[v] = S::Add(acc[v], S::Srav(S::Load(s + v * L), cnt));
      }
      for (const ShiftConvEntry* e = en; e < e1; ++e) {       // negative weights: acc -= x >> m
        const I cnt = S::Set1(e->shift);
        const int32_t* s = src + e->offset;
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[v] = S::Sub(acc[v], S::Srav(S::Load(s + v * L), cnt));
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        // y = float(acc) * 2^(e_o - F) + b_o, then the clamp (no FMA: -ffp-contract=off).
        const auto y = S::AddF(S::MulF(S::ToF(acc[v]), scale), bias);
        S::StoreF(res + v * L, S::Clamp(y, lo, hi));
      }
      Scatter(res, f, std::min<int64_t>(V * L, f1 - f), g, r.planes.wq, yn + o * g.oh * g.ow);
    }
  }
}

// AdderConv: outputs [o0, o1) x flat indices [f0, f1); xlo, xhi the range of this image's x_q.
template <class S>
SC_TARGET void AdderTask(const AdderConvRun& r, const int32_t* buf, float* yn, int64_t o0, int64_t o1,
                         int64_t f0, int64_t f1, int64_t xlo, int64_t xhi) {
  using I = typename S::I;
  constexpr int L = S::kLanes, V = S::kVectors;
  const PackedAdderConv& p = *r.p;
  const ConvGeom& g = r.g;
  const int64_t n_entries = p.cg * p.k;
  const auto lo = S::Set1F(r.act.lo), hi = S::Set1F(r.act.hi), unscale = S::Set1F(p.unscale);
  alignas(64) float res[V * L];
  alignas(64) int64_t wide[V * L];
  for (int64_t f = f0; f < f1; f += V * L) {
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t* src = buf + o / g.mg * g.cg * r.planes.channel + f;
      const AdderConvEntry* entries = r.entries + o * n_entries;
      // Every |x_q - w_q| this output can see (junk lanes included: they read x_q values or 0).
      const int64_t bound = std::max<int64_t>({xhi - p.wmin[o], p.wmax[o] - xlo, 1});
      const int64_t chunk = std::max<int64_t>(1, ((int64_t{1} << 31) - 1) / bound);
      const auto bias = S::Set1F(p.bias[o]);
      std::memset(wide, 0, sizeof(wide));
      for (int64_t c0 = 0; c0 < n_entries; c0 += chunk) {
        const AdderConvEntry* e1 = entries + std::min(n_entries, c0 + chunk);
        I acc[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[v] = S::Zero();
        for (const AdderConvEntry* e = entries + c0; e < e1; ++e) {
          const I w = S::Set1(e->w);
          const int32_t* s = src + e->offset;
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[v] = S::Add(acc[v], S::Abs(S::Sub(S::Load(s + v * L), w)));
        }
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) S::AddTo64(wide + v * L, acc[v]);
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        // y = b_o - float32(acc) * 2^-F (int64 rounded to nearest even; exact product), clamp.
        const auto y = S::SubF(bias, S::MulF(S::Int64ToF(wide + v * L), unscale));
        S::StoreF(res + v * L, S::Clamp(y, lo, hi));
      }
      Scatter(res, f, std::min<int64_t>(V * L, f1 - f), g, r.planes.wq, yn + o * g.oh * g.ow);
    }
  }
}

// The work of one image as (output block, flat chunk) tasks.
struct TaskGrid {
  int64_t chunk = 0, chunks = 0, blocks = 0;
  TaskGrid(const ConvGeom& g, const ConvPlanes& pl, int lanes, int vectors) {
    chunk = int64_t{2} * vectors * lanes;
    chunks = (pl.flat + chunk - 1) / chunk;
    blocks = (g.m + kOutBlock - 1) / kOutBlock;
  }
  size_t size() const { return static_cast<size_t>(chunks * blocks); }
};

// Read-through (ConvInputShift): the floats of the per-task shifted planes (kShiftSlots planes of
// the conv's H x W, each rounded up to 16 floats); 0 without a shift.
inline int64_t ShiftSlotFloats(const ConvGeom& g, const ConvInputShift* shift, int64_t* stride) {
  *stride = 0;
  if (shift == nullptr) return 0;
  *stride = (CheckedProduct<ConvError>("shifted plane", {g.h, g.w}) + 15) / 16 * 16;
  return CheckedProduct<ConvError>("shifted planes", {kShiftSlots, *stride});
}

// The read-through slots in use: a task takes the lowest free one and gives it back, so tasks run
// one after another on a thread reuse the same slot (hot in L1/L2) and at most as many are touched
// as tasks run at once (<= kShiftSlots, the most tasks a loop has: one is always free).
class ShiftSlots {
 public:
  int Take() {
    uint32_t m = used_.load(std::memory_order_relaxed);
    for (;;) {
      const int i = __builtin_ctz(~m);  // m has a zero bit below kShiftSlots (see above)
      if (used_.compare_exchange_weak(m, m | (1u << i), std::memory_order_acquire, std::memory_order_relaxed)) return i;
    }
  }
  void Give(int i) { used_.fetch_and(~(1u << i), std::memory_order_release); }

 private:
  std::atomic<uint32_t> used_{0};
};
static_assert(kShiftSlots <= 32, "ShiftSlots holds one bit per slot");

// Calls body(i0, i1, slot) over [0, items) in at most kShiftSlots tasks of consecutive items on
// ORT's pool, each holding a free slot (slots + k * slot_stride floats) while it runs.
template <class Body>
void ForSlotTasks(int64_t items, float* slots, int64_t slot_stride, const Parallel& par, const Body& body) {
  if (items <= 0) return;
  const int64_t per = (items + kShiftSlots - 1) / kShiftSlots, tasks = (items + per - 1) / per;
  ShiftSlots free;
  par.For(static_cast<size_t>(tasks), [&](size_t t) {
    const int k = free.Take();
    const int64_t i0 = static_cast<int64_t>(t) * per;
    body(i0, std::min(items, i0 + per), slots + k * slot_stride);
    free.Give(k);
  });
}

// Calls build(c, src) for every channel c of image n, src its [H][W] input plane: X's own, or
// with a shift the channel's shifted plane, produced into a slot first. Without a shift one task
// per channel; with one at most kShiftSlots tasks of consecutive channels, each holding a free
// slot while it runs (slots: kShiftSlots * slot_stride floats).
template <class Build>
void ForChannels(const ConvGeom& g, const ConvInputShift* shift, const float* x, int64_t n, float* slots,
                 int64_t slot_stride, const Parallel& par, const Build& build) {
  if (shift == nullptr) {
    const float* xn = x + n * g.c * g.h * g.w;
    par.For(static_cast<size_t>(g.c), [&](size_t ci) {
      const int64_t c = static_cast<int64_t>(ci);
      build(c, xn + c * g.h * g.w);
    });
    return;
  }
  ForSlotTasks(g.c, slots, slot_stride, par, [&](int64_t c0, int64_t c1, float* slot) {
    for (int64_t c = c0; c < c1; ++c) {
      shift->Plane(x, n, c, slot);
      build(c, static_cast<const float*>(slot));
    }
  });
}

// Scratch: [copies][C planes] + slack (one copy: x_q), then per channel a row buffer of Wq * sw + lanes int32
// and the channel's x_q range, then `extra` floats (*extra_ptr; the read-through slots).
template <class S>
int32_t* PlaneScratch(const ConvGeom& g, const ConvPlanes& pl, int copies, AlignedBuffer& scratch,
                      int32_t** tmp, int32_t** range, int64_t* tmp_stride, int64_t extra = 0,
                      float** extra_ptr = nullptr) {
  *tmp_stride = (pl.wq * g.sw + S::kLanes + 15) / 16 * 16;
  const int64_t planes = (pl.Total(copies) + 15) / 16 * 16;
  const int64_t rows = (CheckedProduct<ConvError>("conv scratch", {g.c, *tmp_stride + 2}) + 15) / 16 * 16;
  int64_t total = 0;
  if (!AddOk(rows, planes, &total) || !AddOk(total, extra, &total) || total > (int64_t{1} << 40))
    throw ConvError{"conv scratch does not fit"};
  scratch.Reserve(static_cast<size_t>(total) * 4);
  int32_t* buf = scratch.As<int32_t>();
  std::memset(buf + pl.count * copies, 0, static_cast<size_t>(pl.slack) * 4);
  *tmp = buf + planes;
  *range = *tmp + g.c * *tmp_stride;
  if (extra_ptr != nullptr) *extra_ptr = reinterpret_cast<float*>(buf + planes + rows);
  return buf;
}

template <class S>
void ShiftConvSimd(const ShiftConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  const ConvGeom& g = r.g;
  const ConvPlanes& pl = r.planes;
  int32_t *tmp = nullptr, *range = nullptr;
  int64_t tmp_stride = 0, slot_stride = 0;
  float* slots = nullptr;
  const int64_t slot_floats = ShiftSlotFloats(g, r.shift, &slot_stride);
  int32_t* buf = PlaneScratch<S>(g, pl, 1, scratch, &tmp, &range, &tmp_stride, slot_floats, &slots);
  // S::kVectors vectors of flat outputs per pass, but half as many when an output's inputs
  // ((C/G) * K * T int32 rows of V * S::kLanes) would overflow L1 at the full count (a ResNet
  // pointwise layer with few outputs, e.g. 144->24, which the lookup-table path does not take).
  // Also half as many when that leaves fewer junk outputs in the last pass (7 x 7 images: 63
  // flat outputs are one pass of 64, not of 128).
  const int64_t per_output = g.cg * g.k * r.p->terms;
  constexpr int kHalf = S::kVectors > 4 ? S::kVectors / 2 : S::kVectors;
  constexpr int64_t kFull = int64_t{S::kVectors} * S::kLanes, kHalfSpan = int64_t{kHalf} * S::kLanes;
  const bool half = S::kVectors > 4 && (per_output * kFull * 4 > (int64_t{32} << 10) ||
                                        (pl.flat + kHalfSpan - 1) / kHalfSpan * kHalfSpan <
                                            (pl.flat + kFull - 1) / kFull * kFull);
  const TaskGrid grid(g, pl, S::kLanes, half ? kHalf : S::kVectors);
  for (int64_t n = 0; n < g.n; ++n) {
    float* yn = y + n * g.m * g.oh * g.ow;
    if (g.cg == 1) {
      // Depthwise (each group one channel): a channel's planes are built and read by its M/G
      // outputs in one task, while they are in L1/L2, instead of all planes first (MBs for
      // MobileNetV2's early layers) and then read back.
      ForChannels(g, r.shift, x, n, slots, slot_stride, par, [&](int64_t c, const float* src) {
        BuildChannel<S>(src, g, pl, &r.p->quant, buf + c * pl.channel, tmp + c * tmp_stride, false, range + 2 * c,
                        range + 2 * c + 1);
        if (half) {
          ShiftTask<S, kHalf>(r, buf, yn, c * g.mg, (c + 1) * g.mg, 0, pl.flat);
        } else {
          ShiftTask<S>(r, buf, yn, c * g.mg, (c + 1) * g.mg, 0, pl.flat);
        }
      });
      continue;
    }
    ForChannels(g, r.shift, x, n, slots, slot_stride, par, [&](int64_t c, const float* src) {
      BuildChannel<S>(src, g, pl, &r.p->quant, buf + c * pl.channel, tmp + c * tmp_stride, false, range + 2 * c,
                      range + 2 * c + 1);
    });
    par.For(grid.size(), [&](size_t t) {
      const int64_t b = static_cast<int64_t>(t) / grid.chunks, k = static_cast<int64_t>(t) % grid.chunks;
      const int64_t o0 = b * kOutBlock, o1 = std::min(g.m, (b + 1) * kOutBlock), f0 = k * grid.chunk;
      const int64_t f1 = std::min(pl.flat, (k + 1) * grid.chunk);
      if (half) {
        ShiftTask<S, kHalf>(r, buf, yn, o0, o1, f0, f1);
      } else {
        ShiftTask<S>(r, buf, yn, o0, o1, f0, f1);
      }
    });
  }
}

template <class S>
bool AdderConvSimd(const AdderConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  const ConvGeom& g = r.g;
  const ConvPlanes& pl = r.planes;
  int32_t *tmp = nullptr, *range = nullptr;
  int64_t tmp_stride = 0;
  int32_t* buf = PlaneScratch<S>(g, pl, 1, scratch, &tmp, &range, &tmp_stride);
  const TaskGrid grid(g, pl, S::kLanes, S::kVectors);
  int64_t wlo = 0, whi = 0;
  for (int64_t o = 0; o < g.m; ++o) {
    wlo = std::min<int64_t>(wlo, r.p->wmin[o]);
    whi = std::max<int64_t>(whi, r.p->wmax[o]);
  }
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * g.c * g.h * g.w;
    float* yn = y + n * g.m * g.oh * g.ow;
    par.For(static_cast<size_t>(g.c), [&](size_t ci) {
      const int64_t c = static_cast<int64_t>(ci);
      BuildChannel<S>(xn + c * g.h * g.w, g, pl, &r.p->quant, buf + c * pl.channel, tmp + c * tmp_stride, true,
                      range + 2 * c, range + 2 * c + 1);
    });
    int64_t xlo = 0, xhi = 0;
    for (int64_t c = 0; c < g.c; ++c) {
      xlo = std::min<int64_t>(xlo, range[2 * c]);
      xhi = std::max<int64_t>(xhi, range[2 * c + 1]);
    }
    // A difference of 2^31 or more does not fit an int32 lane: the caller runs the scalar kernel
    // (only inputs or weights near the ends of a 32-bit format get here).
    if (xhi - wlo >= (int64_t{1} << 31) || whi - xlo >= (int64_t{1} << 31)) return false;
    par.For(grid.size(), [&](size_t t) {
      const int64_t b = static_cast<int64_t>(t) / grid.chunks, k = static_cast<int64_t>(t) % grid.chunks;
      AdderTask<S>(r, buf, yn, b * kOutBlock, std::min(g.m, (b + 1) * kOutBlock), k * grid.chunk,
                   std::min(pl.flat, (k + 1) * grid.chunk), xlo, xhi);
    });
  }
  return true;
}

}  // namespace
}  // namespace mfconvert
