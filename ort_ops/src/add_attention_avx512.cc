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

}  // namespace mfconvert

#pragma GCC pop_options
