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
  static void AddTail(float* acc, const float* row, int64_t n) {
    for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
  }
};

#include "add_attention_impl.h"

}  // namespace

void AddAttentionAvx2(const AddAttentionProblem& p, const Parallel& par) { Run(p, par); }

}  // namespace mfconvert

#pragma GCC pop_options
