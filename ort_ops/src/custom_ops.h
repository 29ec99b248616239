// The custom ops of domain ai.mfconvert; register_ops.cc adds every op listed here.
#pragma once

#include "ort_api.h"

namespace mfconvert {

inline constexpr const char* kDomain = "ai.mfconvert";

// One accessor per op, returning a process-lifetime OrtCustomOp.
const OrtCustomOp* ShiftLinearCustomOp();
const OrtCustomOp* AddLinearAttentionCustomOp();

}  // namespace mfconvert
