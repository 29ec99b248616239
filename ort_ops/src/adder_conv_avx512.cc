// AdderConv with AVX-512, selected at run time: shift_conv_simd.h's kernel on this ISA's traits.
#include "shift_conv_simd_avx512.h"
#include "shift_conv_simd.h"

namespace mfconvert {

bool AdderConvAvx512(const AdderConvRun& r, const float* x, float* y, const Parallel& par, AlignedBuffer& scratch) {
  return AdderConvSimd<SimdAvx512>(r, x, y, par, scratch);
}

}  // namespace mfconvert
