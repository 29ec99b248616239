// AdderConv with AVX2, selected at run time: shift_conv_simd.h's kernel on this ISA's traits.
#include "shift_conv_simd_avx2.h"
#include "shift_conv_simd.h"

namespace mfconvert {

bool AdderConvAvx2(const AdderConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  return AdderConvSimd<SimdAvx2>(r, x, y, par, scratch);
}

}  // namespace mfconvert
