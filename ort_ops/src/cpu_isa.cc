#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace mfconvert {

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

Isa DetectIsa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

bool SelectIsa(Isa* isa, std::string* error) {
  const Isa best = DetectIsa();
  const char* env = std::getenv("MFCONVERT_ISA");
  if (env == nullptr || *env == '\0') {
    *isa = best;
    return true;
  }
  Isa want;
  if (std::strcmp(env, "scalar") == 0) {
    want = Isa::kScalar;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else {
    *error = std::string("MFCONVERT_ISA=") + env + " is not one of scalar, avx2, avx512";
    return false;
  }
  if (static_cast<int>(want) > static_cast<int>(best)) {
    *error = std::string("MFCONVERT_ISA=") + env + " but this CPU supports at most " + IsaName(best);
    return false;
  }
  *isa = want;
  return true;
}

}  // namespace mfconvert
