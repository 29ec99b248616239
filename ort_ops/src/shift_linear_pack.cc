#include "shift_linear_pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace mfconvert {

namespace {

constexpr int64_t kMaxFeatures = int64_t{1} << 22;  // docs/ops.md: in, out, terms * in

// The B-bit code j of the LSB-first bit stream `bytes` (of `n` bytes).
inline unsigned CodeAt(const uint8_t* bytes, int64_t n, int64_t j, int bits) {
  const int64_t pos = j * bits;
  const int64_t k = pos >> 3;
  unsigned v = bytes[k];
  if (k + 1 < n) v |= unsigned{bytes[k + 1]} << 8;
  return (v >> (pos & 7)) & ((1u << bits) - 1);
}

}  // namespace

ActQuant ActQuant::Make(int act_bits, int act_frac_bits) {
  ActQuant q;
  q.scale = std::ldexp(1.0f, act_frac_bits);
  q.hi = std::ldexp(1.0f, act_bits - 1);
  q.lo = -q.hi;
  q.qhi = static_cast<int32_t>((int64_t{1} << (act_bits - 1)) - 1);
  q.qlo = static_cast<int32_t>(-(int64_t{1} << (act_bits - 1)));
  return q;
}

std::string CheckAttrs(const ShiftLinearAttrs& a) {
  if (a.in_features < 1 || a.in_features > kMaxFeatures)
    return "attribute in_features=" + std::to_string(a.in_features) + " is outside [1, " +
           std::to_string(kMaxFeatures) + "]";
  if (a.out_features < 1 || a.out_features > kMaxFeatures)
    return "attribute out_features=" + std::to_string(a.out_features) + " is outside [1, " +
           std::to_string(kMaxFeatures) + "]";
  if (a.weight_bits < 2 || a.weight_bits > 5)
    return "attribute weight_bits=" + std::to_string(a.weight_bits) + " is outside [2, 5]";
  if (a.act_bits < 2 || a.act_bits > 32)
    return "attribute act_bits=" + std::to_string(a.act_bits) + " is outside [2, 32]";
  if (a.act_frac_bits < -32 || a.act_frac_bits > 32)
    return "attribute act_frac_bits=" + std::to_string(a.act_frac_bits) + " is outside [-32, 32]";
  if (a.terms < 1 || a.terms > kMaxTerms)
    return "attribute terms=" + std::to_string(a.terms) + " is outside [1, " + std::to_string(kMaxTerms) + "]";
  if (a.terms * a.in_features > kMaxFeatures)
    return "terms * in_features = " + std::to_string(a.terms * a.in_features) + " is above " +
           std::to_string(kMaxFeatures);
  return {};
}

void WidenRows(const float* x, int64_t rows, int64_t in, int terms, std::vector<float>* wide) {
  wide->resize(static_cast<size_t>(rows * terms * in));
  float* w = wide->data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int t = 0; t < terms; ++t, w += in) std::memcpy(w, x + r * in, static_cast<size_t>(in) * sizeof(float));
  }
}

std::string PackShiftLinear(const ShiftLinearAttrs& attrs, Isa isa, const uint8_t* w_codes,
                            const int8_t* w_exponent, const float* bias, PackedShiftLinear* out) {
  const int64_t terms = attrs.terms, one = attrs.in_features;
  const int64_t in = terms * one, outf = attrs.out_features;  // in: the widened input
  const int bits = attrs.weight_bits;
  const unsigned zero_shift = (1u << (bits - 1)) - 1;
  const int64_t n_bytes = (in * outf * bits + 7) / 8;

  PackedShiftLinear& p = *out;
  p.attrs = attrs;
  p.attrs.in_features = in;
  p.attrs.terms = 1;
  p.isa = isa;
  p.quant = ActQuant::Make(attrs.act_bits, attrs.act_frac_bits);
  p.tiles = (outf + kTileOut - 1) / kTileOut;
  p.lut_groups = (outf + kLutOut - 1) / kLutOut;

  const int64_t padded = (p.lut_groups + 1) * kLutOut;  // also covers tiles * kTileOut
  p.scale.assign(padded, 1.0f);
  p.bias.assign(padded, 0.0f);
  p.neg_count.assign(padded, 0);
  for (int64_t o = 0; o < outf; ++o) {
    const int shift = int{w_exponent[o]} - attrs.act_frac_bits;
    if (shift < -126 || shift > 127) {
      return "W_exponent[" + std::to_string(o) + "]=" + std::to_string(int{w_exponent[o]}) +
             " minus act_frac_bits=" + std::to_string(attrs.act_frac_bits) + " is " +
             std::to_string(shift) + ", outside [-126, 127]";
    }
    p.scale[o] = std::ldexp(1.0f, shift);
    if (bias != nullptr) p.bias[o] = bias[o];
  }

  // Normalised codes [out][in]: stream code (t * out + o) * one + i goes to column t * one + i.
  std::vector<uint8_t> codes(static_cast<size_t>(in * outf));
  for (int64_t j = 0; j < in * outf; ++j) {
    const unsigned c = CodeAt(w_codes, n_bytes, j, bits);
    const unsigned m = c & zero_shift;
    const unsigned s = c >> (bits - 1);
    const int64_t t = j / (outf * one), o = j / one % outf, i = j % one;
    codes[o * in + t * one + i] = m == zero_shift ? kZeroCode : static_cast<uint8_t>(s << 4 | m);
  }
  for (int64_t o = 0; o < outf; ++o) {
    int32_t neg = 0;
    for (int64_t i = 0; i < in; ++i) neg += codes[o * in + i] >> 4;
    p.neg_count[o] = neg;
  }

  if (isa == Isa::kScalar) {
    p.codes = std::move(codes);
    return {};
  }

  if (isa == Isa::kAvx512) {
    // Output-vectorised lookup-table kernel: codes [group][i][t][kLutOut], i < one.
    p.lut_terms = static_cast<int>(terms);
    p.lut_codes.Reserve(static_cast<size_t>(p.lut_groups * in * kLutOut));
    uint8_t* l = p.lut_codes.As<uint8_t>();
    for (int64_t g = 0; g < p.lut_groups; ++g) {
      for (int64_t i = 0; i < one; ++i) {
        for (int64_t t = 0; t < terms; ++t) {
          for (int r = 0; r < kLutOut; ++r, ++l) {
            // byte r holds output 16 * (r % 4) + r / 4 (LutCodeOutput)
            const int64_t o = g * kLutOut + LutCodeOutput(r);
            *l = o < outf ? codes[o * in + t * one + i] : kZeroCode;
          }
        }
      }
    }
    return {};
  }

  // Token-vectorised kernel (AVX2): TileEntry [tile][in][kTileOut].
  p.tile_entries.Reserve(static_cast<size_t>(p.tiles * in * kTileOut) * sizeof(TileEntry));
  TileEntry* e = p.tile_entries.As<TileEntry>();
  for (int64_t t = 0; t < p.tiles; ++t) {
    for (int64_t i = 0; i < in; ++i) {
      const int64_t chunk0 = i / kInChunk * kInChunk, local = i - chunk0;
      const uint32_t zero_row = static_cast<uint32_t>(std::min(kInChunk, in - chunk0) * kInputBytes);
      for (int r = 0; r < kTileOut; ++r, ++e) {
        const int64_t o = t * kTileOut + r;
        const uint8_t c = o < outf ? codes[o * in + i] : kZeroCode;
        if (c == kZeroCode) {
          *e = TileEntry{0, zero_row};
        } else {
          *e = TileEntry{c & 15, static_cast<uint32_t>(local * kInputBytes + (c >> 4) * kRowBytes)};
        }
      }
    }
  }

  return {};
}

}  // namespace mfconvert
