// Portable AddLinearAttention kernel (the reference path; also what MFCONVERT_ISA=scalar runs).
#include <algorithm>
#include <cmath>
#include <vector>

#include "add_attention.h"

namespace mfconvert {
namespace {

struct Vec {
  static constexpr int64_t kWidth = 1;
  static float Load(const float* x) { return *x; }
  static void Store(float* x, float v) { *x = v; }
  static float Add(float a, float b) { return a + b; }
  static float Zero() { return 0.0f; }
  static float Mul(float a, float b) { return a * b; }
  static float Set1(float x) { return x; }
  static float Div(float a, float b) { return a / b; }
  static void AddTail(float*, const float*, int64_t) {}
};

#include "add_attention_impl.h"

}  // namespace

void AddAttentionScalar(const AddAttentionProblem& p, const Parallel& par) { Run(p, par); }

void PositiveBitsScalar(const float* x, int64_t depth, uint64_t* out) {
  std::fill(out, out + (depth + 63) / 64, uint64_t{0});
  for (int64_t d = 0; d < depth; ++d) out[d / 64] |= static_cast<uint64_t>(x[d] > 0.0f) << (d % 64);
}

}  // namespace mfconvert
