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
  static void AddTail(float*, const float*, int64_t) {}
};

#include "add_attention_impl.h"

}  // namespace

void AddAttentionScalar(const AddAttentionProblem& p, const Parallel& par) { Run(p, par); }

}  // namespace mfconvert
