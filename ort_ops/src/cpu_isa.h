// Which SIMD kernels this CPU can run, and the MFCONVERT_ISA override used by the tests.
#pragma once

#include <string>

namespace mfconvert {

enum class Isa { kScalar, kAvx2, kAvx512 };

const char* IsaName(Isa isa);

// The best ISA the CPU (and OS) supports.
Isa DetectIsa();

// The ISA a kernel should use: DetectIsa(), unless the environment variable MFCONVERT_ISA is
// set to "scalar", "avx2" or "avx512" (read at kernel creation; forces that path so tests can
// compare all of them). Returns false with `error` set when the value is unknown or the CPU
// cannot run the requested path.
bool SelectIsa(Isa* isa, std::string* error);

}  // namespace mfconvert
