// AVX-512 AddLinearAttention kernel: rows added 16 floats at a time, masked tail.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "add_attention.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")

namespace mfconvert {
namespace {

struct Vec {
  static constexpr int64_t kWidth = 16;
  static __m512 Load(const float* x) { return _mm512_loadu_ps(x); }
  static void Store(float* x, __m512 v) { _mm512_storeu_ps(x, v); }
  static __m512 Add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 Zero() { return _mm512_setzero_ps(); }
  static __m512 Mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
  static __m512 Set1(float x) { return _mm512_set1_ps(x); }
  static __m512 Div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
  static void AddTail(float* acc, const float* row, int64_t n) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(acc, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc), _mm512_maskz_loadu_ps(m, row)));
  }
};

// The key masks of add_attention_impl.h's PartialS (same result as its generic KeyMasks): the
// codes of 64 keys in 8 zmm (a masked key's code as 0), then per code bit r one vptestmq per 8 keys.
constexpr int64_t kKeyMaskWords = 256 / 64;  // add_attention_impl.h's kKeyWords
void KeyMasks(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
              uint64_t* kt);
#define MF_KEY_MASKS 1
#include "add_attention_impl.h"
static_assert(kKeyMaskWords == kKeyWords, "kKeyChunk changed");

void KeyMasks(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
              uint64_t* kt) {
  const uint64_t* codes = p.k_codes + ((b * p.heads + h) * p.tokens) * p.words;
  alignas(64) uint64_t block[64];
  for (int64_t k0 = j0; k0 < j1; k0 += 64) {
    const int64_t n = std::min<int64_t>(64, j1 - k0), kw = (k0 - j0) / 64;
    for (int64_t w = r0 / 64; w * 64 < r1; ++w) {
      for (int64_t k = 0; k < 64; ++k) {
        const int64_t j = k0 + k;
        block[k] = k < n && (p.keep == nullptr || p.keep[b * p.tokens + j]) ? codes[j * p.words + w] : 0;
      }
      __m512i z[8];
      for (int q = 0; q < 8; ++q) z[q] = _mm512_load_si512(block + 8 * q);
      for (int64_t r = std::max(r0, w * 64); r < std::min(r1, w * 64 + 64); ++r) {
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << (r - w * 64)));
        uint64_t m = 0;
        for (int q = 0; q < 8; ++q) m |= static_cast<uint64_t>(_mm512_test_epi64_mask(z[q], bit)) << (8 * q);
        kt[(r - r0) * kKeyWords + kw] = m;
      }
    }
  }
}

}  // namespace

void AddAttentionAvx512(const AddAttentionProblem& p, const Parallel& par) { Run(p, par); }

void PositiveBitsAvx512(const float* x, int64_t depth, uint64_t* out) {
  std::fill(out, out + (depth + 63) / 64, uint64_t{0});
  for (int64_t d = 0; d < depth; d += 16) {  // 16 | 64: a chunk never straddles two words
    const int64_t n = std::min<int64_t>(16, depth - d);
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1);
    const __mmask16 gt = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m, x + d), _mm512_setzero_ps(), _CMP_GT_OQ);
    out[d / 64] |= static_cast<uint64_t>(gt) << (d % 64);
  }
}

}  // namespace mfconvert

#pragma GCC pop_options
