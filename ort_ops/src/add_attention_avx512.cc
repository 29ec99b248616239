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
  static void AddTail(float* acc, const float* row, int64_t n) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(acc, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc), _mm512_maskz_loadu_ps(m, row)));
  }
};

#include "add_attention_impl.h"

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
