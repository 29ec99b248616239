// ShiftLinear weights decoded from the packed B-bit codes (docs/ops.md#weight-codes) and laid
// out for the kernel of one ISA, plus the activation format. Built once per kernel when the
// weights are initializers, else on every Compute.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "cpu_isa.h"

namespace mfconvert {

struct ShiftLinearAttrs {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int weight_bits = 5;
  int act_bits = 32;
  int act_frac_bits = 16;
  int terms = 1;  // powers of two per weight; codes [terms][out][in]
};

inline constexpr int kMaxTerms = 4;

// Step 1 of the arithmetic: x_q = sat_A(floor(x * 2^F)), NaN -> 0.
struct ActQuant {
  float scale;      // 2^F
  float hi;         // 2^(A-1): floor(x * 2^F) >= hi saturates to qhi
  float lo;         // -2^(A-1): floor(x * 2^F) <= lo gives qlo
  int32_t qhi, qlo;

  static ActQuant Make(int act_bits, int act_frac_bits);
};

// A weight in "normalised code" form: sign << 4 | shift, with shift 15 (and sign 0) for zero.
inline constexpr uint8_t kZeroCode = 15;

// Token-vectorised kernel (AVX2): an output tile has kTileOut outputs; for each
// (tile, input i, output r) one TileEntry says which activation row to add, shifted right.
// The activation buffer of a block of kBlockTokens tokens holds, per input i, the row x_q and
// the row ~x_q (each kBlockTokens int32), then one zero row; -(x >> m) = (~x >> m) + 1, so a
// negative weight adds the ~x_q row and the "+1"s are added once per output (neg_count).
inline constexpr int kTileOut = 6;
inline constexpr int kBlockTokens = 64;
inline constexpr int64_t kRowBytes = kBlockTokens * 4;
inline constexpr int64_t kInputBytes = 2 * kRowBytes;
// Inputs are quantised kInChunk at a time (a block's buffer stays <= 4 MiB at any in_features),
// so offsets count from the start of input i's chunk, c = i / kInChunk.
inline constexpr int64_t kInChunk = 8192;
struct TileEntry {
  int32_t shift;    // m (0 for a zero weight)
  uint32_t offset;  // byte offset of the row in the block: (i - c*kInChunk)*kInputBytes
                    // (+kRowBytes if negative), or the zero row after the chunk's inputs
};

// Output-vectorised lookup-table kernel (AVX-512): codes as bytes in [group][i][kLutOut].
// Within a row of 64 bytes, byte 4j + b holds output 16b + j: read as 16 dwords, byte b of
// every dword is the code of output block b, and a dword shift right by 8b brings it to the
// low 5 bits that vpermt2d reads (the higher bits are ignored), so no byte-to-dword widening
// (a port-5 shuffle, the port the table lookups need) is spent per block.
inline constexpr int kLutOut = 64;
inline constexpr int LutCodeOutput(int byte) { return 16 * (byte % 4) + byte / 4; }

// A layer of T terms is packed as one term over the input repeated T times: its attrs say
// in_features = T * in (column t * in + i holds term t of input i) and terms = 1, and the scalar
// and AVX2 kernels read X widened the same way (WidenRows), so they serve every T unchanged.
// The AVX-512 kernel reads X as it is (lut_terms = T): its codes are [group][i][t][kLutOut], so
// the table of input i, built once, serves all T terms.
struct PackedShiftLinear {
  ShiftLinearAttrs attrs;
  ActQuant quant{};
  Isa isa = Isa::kScalar;
  int64_t tiles = 0;       // ceil(out / kTileOut)
  int64_t lut_groups = 0;  // ceil(out / kLutOut)
  int lut_terms = 1;       // AVX-512: the original terms; X has in_features / lut_terms columns
  // Per output, padded with zeros/ones to a multiple of kLutOut.
  std::vector<float> scale;         // 2^(e_o - F)
  std::vector<float> bias;          // b_o, or 0
  std::vector<int32_t> neg_count;   // number of negative nonzero weights of output o
  std::vector<uint8_t> codes;       // scalar: normalised codes [out][in]
  AlignedBuffer tile_entries;       // AVX2: TileEntry [tile][in][kTileOut]
  AlignedBuffer lut_codes;          // AVX-512: normalised codes [group][in / T][T][kLutOut]
};

// Checks the attribute ranges; returns an empty string or what is wrong.
std::string CheckAttrs(const ShiftLinearAttrs& a);

// X [rows][in] repeated `terms` times along each row, into `wide` [rows][terms * in].
void WidenRows(const float* x, int64_t rows, int64_t in, int terms, std::vector<float>* wide);

// Decodes and lays out the weights. Returns an empty string, or what is wrong with the inputs
// (lengths are checked by the caller; this checks e_o - F).
std::string PackShiftLinear(const ShiftLinearAttrs& attrs, Isa isa, const uint8_t* w_codes,
                            const int8_t* w_exponent, const float* bias, PackedShiftLinear* out);

}  // namespace mfconvert
