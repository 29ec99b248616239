// AVX2 AddLinearAttention kernel: rows added 8 floats at a time, scalar tail.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "add_attention.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace mfconvert {
namespace {

struct Vec {
  static constexpr int64_t kWidth = 8;
  static __m256 Load(const float* x) { return _mm256_loadu_ps(x); }
  static void Store(float* x, __m256 v) { _mm256_storeu_ps(x, v); }
  static __m256 Add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 Zero() { return _mm256_setzero_ps(); }
  static __m256 Mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
  static __m256 Set1(float x) { return _mm256_set1_ps(x); }
  static __m256 Div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
  static void AddTail(float* acc, const float* row, int64_t n) {
    for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
  }
};

#include "add_attention_impl.h"

}  // namespace

void AddAttentionAvx2(const AddAttentionProblem& p, const Parallel& par) { Run(p, par); }

void PositiveBitsAvx2(const float* x, int64_t depth, uint64_t* out) {
  std::fill(out, out + (depth + 63) / 64, uint64_t{0});
  int64_t d = 0;
  for (; d + 8 <= depth; d += 8) {  // 8 | 64: a chunk never straddles two words
    const __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(x + d), _mm256_setzero_ps(), _CMP_GT_OQ);
    out[d / 64] |= static_cast<uint64_t>(static_cast<unsigned>(_mm256_movemask_ps(gt))) << (d % 64);
  }
  for (; d < depth; ++d) out[d / 64] |= static_cast<uint64_t>(x[d] > 0.0f) << (d % 64);
}

}  // namespace mfconvert

#pragma GCC pop_options
