// ShiftConv with AVX2, selected at run time: shift_conv_simd.h's kernel on this ISA's traits.
#include "shift_conv_simd_avx2.h"
#include "shift_conv_simd.h"

namespace mfconvert {

void ShiftConvAvx2(const ShiftConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  ShiftConvSimd<SimdAvx2>(r, x, y, par, scratch);
}

}  // namespace mfconvert
