// ShiftLinear with AVX2, selected at run time on CPUs without AVX-512: the token-vectorised
// scheme of shift_linear_avx512.cc with 8 tokens per ymm and 16-token sub-blocks.
#include <immintrin.h>

#include <cstring>

#include "shift_linear_kernels.h"

#define MF_AVX2 __attribute__((target("avx2,fma")))

namespace mfconvert {

namespace {

MF_AVX2 inline __m256i Quantize8(__m256 x, const ActQuant& q) {
  const __m256 f = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(q.scale)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256i r = _mm256_cvttps_epi32(f);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(q.qhi),
                         _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(q.hi), _CMP_GE_OQ)));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(q.qlo),
                         _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(q.lo), _CMP_LE_OQ)));
  return _mm256_and_si256(r, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));  // NaN -> 0
}

MF_AVX2 inline __m256i FirstLanes8(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), iota);
}

// Quantises inputs [0, n) of tokens [0, valid) (valid <= 16) of rows x[t * stride] into
// sub-block `sub` of a block.
MF_AVX2 void QuantizeSubBlock(const float* x, int64_t stride, int64_t n, int64_t valid, const ActQuant& q,
                              uint8_t* block, int sub) {
  alignas(32) int32_t tmp[16][8];
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t ni = std::min<int64_t>(8, n - i0);
    const __m256i im = FirstLanes8(ni);
    for (int t = 0; t < 16; ++t) {
      const __m256 v = t < valid ? _mm256_maskload_ps(x + t * stride + i0, im) : _mm256_setzero_ps();
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[t]), Quantize8(v, q));
    }
    for (int k = 0; k < ni; ++k) {
      int32_t* row = reinterpret_cast<int32_t*>(block + (i0 + k) * kInputBytes) + sub * 16;
      for (int t = 0; t < 16; ++t) {
        row[t] = tmp[t][k];
        row[kBlockTokens + t] = ~tmp[t][k];
      }
    }
  }
  if (sub == 0) {
    int32_t* zero = reinterpret_cast<int32_t*>(block + n * kInputBytes);
    for (int t = 0; t < kBlockTokens; ++t) zero[t] = 0;
  }
}

// Outputs [3 h, 3 h + 3) of one output tile (h = 0, 1) for tokens [16 s, 16 s + valid) of a
// block, NZ = ceil(valid / 8) ymm, over the n inputs of the block's chunk (entries e). Half
// tiles: 3 x 2 accumulators, a shift count and two rows fit the 16 ymm registers (a whole
// tile's 12 accumulators made GCC spill them to the stack). With more than one chunk the int32
// sums of the chunks before (`first` false) are read back from y, and stored there for the next
// (`last` false); int32 addition wraps, so the result is the same in any chunking.
static_assert(kTileOut == 6, "TileTokens splits a tile into two halves of 3 outputs");
template <int NZ>
MF_AVX2 void TileTokens(const uint8_t* block, int s, const TileEntry* e, int64_t n, int h,
                        const PackedShiftLinear& p, int64_t tile, int64_t valid, bool first, bool last,
                        float* y) {
  const int64_t out = p.attrs.out_features;
  const int64_t o0 = tile * kTileOut + 3 * h;
  const int nr = static_cast<int>(std::min<int64_t>(3, out - o0));
  alignas(32) int32_t part[3][16];
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  if (!first) {
    std::memset(part, 0, sizeof(part));
    for (int64_t t = 0; t < valid; ++t)
      for (int r = 0; r < nr; ++r) std::memcpy(&part[r][t], y + t * out + o0 + r, 4);
    const __m256i* pv = reinterpret_cast<const __m256i*>(part[0]);
    a00 = _mm256_load_si256(pv); a01 = _mm256_load_si256(pv + 1);
    a10 = _mm256_load_si256(pv + 2); a11 = _mm256_load_si256(pv + 3);
    a20 = _mm256_load_si256(pv + 4); a21 = _mm256_load_si256(pv + 5);
  }
  const uint8_t* base = block + s * 64;
  e += 3 * h;
  // acc[r] += row >> m for the weight (i, r): load, vpsravd, vpaddd per 8 tokens.
#define MF_ADD(r)                                                                             \
  {                                                                                           \
    const __m256i cnt = _mm256_set1_epi32(e[r].shift);                                        \
    const __m256i* src = reinterpret_cast<const __m256i*>(base + e[r].offset);                \
    a##r##0 = _mm256_add_epi32(a##r##0, _mm256_srav_epi32(_mm256_load_si256(src), cnt));       \
    if (NZ > 1) a##r##1 = _mm256_add_epi32(a##r##1, _mm256_srav_epi32(_mm256_load_si256(src + 1), cnt)); \
  }
  for (int64_t i = 0; i < n; ++i, e += kTileOut) {
    MF_ADD(0); MF_ADD(1); MF_ADD(2);
  }
#undef MF_ADD
  if (!last) {
    __m256i* pw = reinterpret_cast<__m256i*>(part[0]);
    _mm256_store_si256(pw, a00); _mm256_store_si256(pw + 1, a01);
    _mm256_store_si256(pw + 2, a10); _mm256_store_si256(pw + 3, a11);
    _mm256_store_si256(pw + 4, a20); _mm256_store_si256(pw + 5, a21);
    for (int64_t t = 0; t < valid; ++t)
      for (int r = 0; r < nr; ++r) std::memcpy(y + t * out + o0 + r, &part[r][t], 4);
    return;
  }
  // y = float(acc + neg_count) * 2^(e_o - F) + b_o, via res[r][token] to transpose.
  alignas(32) float res[3][16];
#define MF_OUT(r)                                                                             \
  {                                                                                           \
    const __m256i neg = _mm256_set1_epi32(p.neg_count[o0 + r]);                               \
    const __m256 scale = _mm256_set1_ps(p.scale[o0 + r]);                                    \
    const __m256 bias = _mm256_set1_ps(p.bias[o0 + r]);                                      \
    const __m256i acc[2] = {a##r##0, a##r##1};                                                \
    for (int z = 0; z < NZ; ++z) {                                                            \
      const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(acc[z], neg));                     \
      _mm256_store_ps(res[r] + 8 * z, _mm256_add_ps(_mm256_mul_ps(f, scale), bias));          \
    }                                                                                         \
  }
  MF_OUT(0); MF_OUT(1); MF_OUT(2);
#undef MF_OUT
  for (int64_t t = 0; t < valid; ++t) {
    float* yt = y + t * out + o0;
    for (int r = 0; r < nr; ++r) yt[r] = res[r][t];
  }
}

// Output tiles [tile0, tile1) of a block, inputs [i0, i0 + n) (one chunk).
MF_AVX2 void TileTask(const uint8_t* block, const PackedShiftLinear& p, int64_t i0, int64_t n,
                      int64_t tile0, int64_t tile1, int64_t valid, float* y) {
  const int64_t in = p.attrs.in_features, out = p.attrs.out_features;
  const bool first = i0 == 0, last = i0 + n == in;
  const TileEntry* entries = p.tile_entries.As<TileEntry>();
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const TileEntry* e = entries + (tile * in + i0) * kTileOut;
    for (int s = 0; s * 16 < valid; ++s) {
      const int64_t v = std::min<int64_t>(16, valid - s * 16);
      float* ys = y + s * 16 * out;
      for (int h = 0; h < 2 && tile * kTileOut + 3 * h < out; ++h) {
        if (v > 8) {
          TileTokens<2>(block, s, e, n, h, p, tile, v, first, last, ys);
        } else {
          TileTokens<1>(block, s, e, n, h, p, tile, v, first, last, ys);
        }
      }
    }
  }
}

}  // namespace

void ShiftLinearAvx2(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                     const Parallel& par, AlignedBuffer& scratch) {
  if (rows <= 0) return;
  const int64_t in = p.attrs.in_features, out = p.attrs.out_features;
  const int64_t block_bytes = token_plan::BlockBytes(in);
  const int64_t blocks_total = (rows + kBlockTokens - 1) / kBlockTokens;
  const int64_t blocks_per_pass = std::min(blocks_total, token_plan::BlocksPerPass(in));
  const int64_t tiles_per_task = token_plan::TilesPerTask(in, p.tiles);
  const int64_t chunks = (p.tiles + tiles_per_task - 1) / tiles_per_task;
  scratch.Reserve(static_cast<size_t>(blocks_per_pass * block_bytes));
  uint8_t* buf = scratch.As<uint8_t>();
  constexpr int kSubs = kBlockTokens / 16;
  for (int64_t b0 = 0; b0 < blocks_total; b0 += blocks_per_pass) {
    const int64_t nb = std::min(blocks_per_pass, blocks_total - b0);
    const int64_t row0 = b0 * kBlockTokens;
    const int64_t pass_rows = std::min(rows - row0, nb * kBlockTokens);
    const int64_t subs = (pass_rows + 15) / 16;
    for (int64_t i0 = 0; i0 < in; i0 += kInChunk) {
      const int64_t n = std::min(kInChunk, in - i0);
      par.For(static_cast<size_t>(subs), [&](size_t s) {
        const int64_t t0 = static_cast<int64_t>(s) * 16;
        QuantizeSubBlock(x + (row0 + t0) * in + i0, in, n, std::min<int64_t>(16, pass_rows - t0), p.quant,
                         buf + (t0 / kBlockTokens) * block_bytes, static_cast<int>(s % kSubs));
      });
      par.For(static_cast<size_t>(nb * chunks), [&](size_t task) {
        const int64_t b = static_cast<int64_t>(task) / chunks;
        const int64_t c = static_cast<int64_t>(task) % chunks;
        const int64_t t0 = b * kBlockTokens;
        const int64_t valid = std::min<int64_t>(kBlockTokens, pass_rows - t0);
        TileTask(buf + b * block_bytes, p, i0, n, c * tiles_per_task,
                 std::min(p.tiles, (c + 1) * tiles_per_task), valid, y + (row0 + t0) * out);
      });
    }
  }
}

}  // namespace mfconvert
