// ShiftConv through the ShiftLinear lookup-table kernel (AVX-512, group 1), selected by
// ShiftConvLutPays (shift_conv.h).
//
// docs/ops.md#arithmetic-shiftconv: a ShiftConv is ShiftLinear over the im2col rows of its
// zero-padded input. Per image the float input is laid out in the stride-phase planes of the SIMD
// kernels (ConvPlanes, 0.0f at padding: 0.0 quantises to 0), so that for a tap the inputs of
// consecutive flat outputs f = oh * Wq + ow are consecutive. A strip of flat outputs then becomes
// im2col rows [f][tap * C + c] by 16 x 16 transposes (the columns in (tap, c) order, which the
// int32 sum does not see, make every tile row a contiguous store), ShiftLinearAvx512 turns them
// into [f][M] (table per token and input, one vpermt2d + vpaddd per 16 MACs, its float epilogue
// y = float(acc) * 2^(e_o - F) + b_o is the conv's step 4), and a transpose back applies the fused
// activation and drops the junk columns ow >= OW. The strip's rows stay in L2 (<= 512 KiB).
//
// Cost beside the lookups: per output element (M / 16 lookups per table) about 4 µops of table
// building per input element of the im2col row, so the path serves layers with M >= 64 outputs;
// the transposes are ~0.25 µop per im2col element (64 shuffles per 16 x 16 tile).
#include "shift_conv_simd_avx512.h"
#include "shift_conv_simd.h"
#include "shift_linear_kernels.h"

namespace mfconvert {

namespace {

using S = SimdAvx512;

SC_INLINE __mmask16 Lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// r[i] lane j -> r[j] lane i.
SC_INLINE void Transpose16(__m512i* r) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < nr, j < nc (nr, nc <= 16).
SC_TARGET void TransposeTile(const int32_t* src, int64_t src_stride, int nr, int nc, int32_t* dst,
                             int64_t dst_stride) {
  __m512i r[16];
  if (nr == 16 && nc == 16) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_stride);
    Transpose16(r);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + j * dst_stride, r[j]);
    return;
  }
  const __mmask16 cm = Lanes(nc), rm = Lanes(nr);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_epi32(cm, src + i * src_stride) : _mm512_setzero_si512();
  Transpose16(r);
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j < nc) _mm512_mask_storeu_epi32(dst + j * dst_stride, rm, r[j]);
}

// Outputs [o0, o0 + nc) x flat [f, f + nr) from ycol ([rows][M], row j at f - f0... given as
// `src`): transposed, the activation applied, the columns ow < OW stored into Y.
SC_TARGET void StoreTile(const float* src, int64_t m, int nr, int nc, const ConvGeom& g, int64_t wq,
                         const ConvActivation& act, int64_t f, int64_t o0, float* yn) {
  const __mmask16 cm = Lanes(nc);
  const int32_t* s = reinterpret_cast<const int32_t*>(src);
  __m512i r[16];
  if (nr == 16 && nc == 16) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * m);
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_epi32(cm, s + i * m) : _mm512_setzero_si512();
  }
  Transpose16(r);
  const __m512 lo = _mm512_set1_ps(act.lo), hi = _mm512_set1_ps(act.hi);
  alignas(64) float res[16];
  if (wq == g.ow) {  // no junk columns: the flat index is Y's
    const __mmask16 rm = Lanes(nr);
    for (int j = 0; j < nc; ++j)
      _mm512_mask_storeu_ps(yn + (o0 + j) * g.oh * g.ow + f, rm, S::Clamp(_mm512_castsi512_ps(r[j]), lo, hi));
    return;
  }
  for (int j = 0; j < nc; ++j) {
    S::StoreF(res, S::Clamp(_mm512_castsi512_ps(r[j]), lo, hi));
    Scatter(res, f, nr, g, wq, yn + (o0 + j) * g.oh * g.ow);
  }
}

}  // namespace

void PackShiftConvLut(const PackedShiftConv& p, PackedShiftLinear* out) {
  const int64_t c = p.cg, k = p.k, m = p.m, terms = p.terms, row = p.cg * p.k;
  const int64_t in = CheckedProduct<ConvError>("terms * K * C", {terms, k, c});
  PackedShiftLinear& l = *out;
  l.attrs = ShiftLinearAttrs{};
  l.attrs.in_features = in;
  l.attrs.out_features = m;
  l.quant = p.quant;
  l.isa = Isa::kAvx512;
  l.lut_groups = (m + kLutOut - 1) / kLutOut;
  l.lut_terms = static_cast<int>(terms);
  const int64_t padded = CheckedProduct<ConvError>("padded outputs", {l.lut_groups + 1, kLutOut});
  l.scale.assign(static_cast<size_t>(padded), 1.0f);
  l.bias.assign(static_cast<size_t>(padded), 0.0f);
  std::copy(p.scale.begin(), p.scale.end(), l.scale.begin());
  std::copy(p.bias.begin(), p.bias.end(), l.bias.begin());
  const int64_t bytes = CheckedProduct<ConvError>("lookup-table codes", {l.lut_groups, in, kLutOut});
  l.lut_codes.Reserve(static_cast<size_t>(bytes));
  uint8_t* d = l.lut_codes.As<uint8_t>();
  // [group][tap * C + c][t][64]; byte r of a row holds output 64 group + LutCodeOutput(r).
  for (int64_t grp = 0; grp < l.lut_groups; ++grp)
    for (int64_t tap = 0; tap < k; ++tap)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t t = 0; t < terms; ++t)
          for (int r = 0; r < kLutOut; ++r, ++d) {
            const int64_t o = grp * kLutOut + LutCodeOutput(r);
            *d = o < m ? p.codes[static_cast<size_t>((o * terms + t) * row + ch * k + tap)] : kZeroCode;
          }
}

void ShiftConvLutAvx512(const ShiftConvLutRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  const ConvGeom& g = r.g;
  const ConvPlanes& pl = r.planes;
  const int64_t c = g.c, m = g.m, in = c * g.k;  // im2col columns (ShiftConvLutPays: <= 2^16)
  // A strip of flat outputs: a multiple of 16 with its im2col rows <= 512 KiB (>= 16 rows).
  const int64_t strip = std::min(std::max<int64_t>(16, (int64_t{1} << 17) / in / 16 * 16), (pl.flat + 15) / 16 * 16);
  const int64_t tmp_stride = (pl.wq * g.sw + S::kLanes + 15) / 16 * 16;
  const int64_t planes = (pl.Total(1) + 15) / 16 * 16;
  const int64_t tmp_total = CheckedProduct<ConvError>("conv scratch rows", {c, tmp_stride + 2});
  const int64_t cols = CheckedProduct<ConvError>("im2col strip", {strip, in + m});
  const bool unpadded_1x1 = g.k == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && g.pb == 0 && g.pr == 0 &&
                            pl.channel == g.h * g.w && pl.wq == g.w && r.tap[0] == 0;
  // Read-through. A 1x1, stride-1, unpadded conv whose flat outputs fit one strip (MobileNetV2's
  // projections from 14 x 14 on): per block of 16 channels the shifted planes go into the task's
  // slot (16 planes, in L1/L2) and are transposed from there into the im2col rows, so the shifted
  // image exists nowhere whole. With more strips the planes are the shifted image itself, written
  // by the shift; other geometries take the shifted planes through slots as the direct kernel.
  const bool one_strip = r.shift != nullptr && unpadded_1x1 && pl.flat <= strip;
  int64_t slot_stride = 0, slot_floats = 0;
  if (one_strip) {
    ShiftSlotFloats(g, r.shift, &slot_stride);
    slot_stride = CheckedProduct<ConvError>("shifted channel blocks", {slot_stride, 16});
    slot_floats = CheckedProduct<ConvError>("shifted channel blocks", {slot_stride, kShiftSlots});
  } else if (!unpadded_1x1) {
    slot_floats = ShiftSlotFloats(g, r.shift, &slot_stride);
  }
  int64_t total = 0;
  if (!AddOk(planes, tmp_total, &total) || !AddOk(total, cols + 16, &total) || !AddOk(total, slot_floats, &total) ||
      total > (int64_t{1} << 40))
    throw ConvError{"conv scratch does not fit"};
  scratch.Reserve(static_cast<size_t>(total) * 4);
  int32_t* buf = scratch.As<int32_t>();
  std::memset(buf + pl.count, 0, static_cast<size_t>(planes - pl.count) * 4);  // slack: 0.0f
  int32_t* tmp = buf + planes;
  int32_t* range = tmp + c * tmp_stride;
  int32_t* xcol = tmp + tmp_total;
  float* ycol = reinterpret_cast<float*>(xcol + (strip * in + 15) / 16 * 16);
  float* slots = ycol + (cols - (strip * in + 15) / 16 * 16) + 16;
  AlignedBuffer inner;  // ShiftLinearAvx512's shared tables (fewer than 32 rows only)
  const int64_t cblocks = (c + 15) / 16, oblocks = (m + 15) / 16;
  for (int64_t n = 0; n < g.n; ++n) {
    float* yn = y + n * g.m * g.oh * g.ow;
    // A 1x1, stride-1, unpadded conv: the planes are the image itself (plane = channel = H * W,
    // Wq = W, tap offset 0) and the transposes read no further than OH * Wq: no copy (with a
    // shift read through, each shifted channel is written straight into its plane).
    const int32_t* planes_n = buf;
    if (one_strip) {
      // xcol[j][c] = shifted x[c][j] (K = 1, tap offset 0, plane = H * W = flat): per task a run of
      // 16-channel blocks, each shifted into the slot the task holds and transposed out of it.
      const int64_t plane = g.h * g.w;
      ForSlotTasks(cblocks, slots, slot_stride, par, [&](int64_t b0, int64_t b1, float* slot) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * 16;
          const int nr = static_cast<int>(std::min<int64_t>(16, c - c0));
          for (int i = 0; i < nr; ++i) r.shift->Plane(x, n, c0 + i, slot + i * plane);
          for (int64_t j0 = 0; j0 < pl.flat; j0 += 16)
            TransposeTile(reinterpret_cast<const int32_t*>(slot) + j0, plane, nr,
                          static_cast<int>(std::min<int64_t>(16, pl.flat - j0)), xcol + j0 * in + c0, in);
        }
      });
      ShiftLinearAvx512(*r.lin, reinterpret_cast<const float*>(xcol), pl.flat, ycol, par, inner);
      par.For(static_cast<size_t>((pl.flat + 15) / 16), [&](size_t task) {
        const int64_t j0 = static_cast<int64_t>(task) * 16;
        const int nr = static_cast<int>(std::min<int64_t>(16, pl.flat - j0));
        for (int64_t ob = 0; ob < oblocks; ++ob)
          StoreTile(ycol + j0 * m + ob * 16, m, nr, static_cast<int>(std::min<int64_t>(16, m - ob * 16)), g, pl.wq,
                    r.act, j0, ob * 16, yn);
      });
      continue;
    }
    if (unpadded_1x1 && r.shift == nullptr) {
      planes_n = reinterpret_cast<const int32_t*>(x + n * g.c * g.h * g.w);
    } else if (unpadded_1x1) {
      // The planes are laid out as one image of the shifted input: SpatialShift's own run (its
      // task split: planes grouped ~16K floats a task, small runs on the calling thread).
      r.shift->Image(x, n, reinterpret_cast<float*>(buf), par, Isa::kAvx512);
    } else {
      ForChannels(g, r.shift, x, n, slots, slot_stride, par, [&](int64_t ch, const float* src) {
        BuildChannel<S>(src, g, pl, nullptr, buf + ch * pl.channel, tmp + ch * tmp_stride, false, range + 2 * ch,
                        range + 2 * ch + 1);
      });
    }
    for (int64_t f0 = 0; f0 < pl.flat; f0 += strip) {
      const int64_t rows = std::min(strip, pl.flat - f0);
      // xcol[j][tap * C + ch] = planes[ch][tap offset + f0 + j]
      par.For(static_cast<size_t>(g.k * cblocks), [&](size_t task) {
        const int64_t tap = static_cast<int64_t>(task) / cblocks, c0 = static_cast<int64_t>(task) % cblocks * 16;
        const int32_t* src = planes_n + c0 * pl.channel + r.tap[tap] + f0;
        const int nr = static_cast<int>(std::min<int64_t>(16, c - c0));
        for (int64_t j0 = 0; j0 < rows; j0 += 16)
          TransposeTile(src + j0, pl.channel, nr, static_cast<int>(std::min<int64_t>(16, rows - j0)),
                        xcol + j0 * in + tap * c + c0, in);
      });
      ShiftLinearAvx512(*r.lin, reinterpret_cast<const float*>(xcol), rows, ycol, par, inner);
      // One task per 16 rows x all outputs (tiles of 16 x 16).
      par.For(static_cast<size_t>((rows + 15) / 16), [&](size_t task) {
        const int64_t j0 = static_cast<int64_t>(task) * 16;
        const int nr = static_cast<int>(std::min<int64_t>(16, rows - j0));
        for (int64_t ob = 0; ob < oblocks; ++ob)
          StoreTile(ycol + j0 * m + ob * 16, m, nr, static_cast<int>(std::min<int64_t>(16, m - ob * 16)), g, pl.wq,
                    r.act, f0 + j0, ob * 16, yn);
      });
    }
  }
}

}  // namespace mfconvert
