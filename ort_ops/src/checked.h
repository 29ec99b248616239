// Overflow-checked int64 size arithmetic: every size or offset built from attributes or input
// shapes goes through these, so a product that wraps is an error, never a wrong index.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

namespace mfconvert {

// *out = a * b (or a + b); false when the exact result does not fit int64.
inline bool MulOk(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
inline bool AddOk(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

// *out = the product of `factors` (1 for none); false on overflow.
inline bool ProductOk(std::initializer_list<int64_t> factors, int64_t* out) {
  int64_t p = 1;
  for (int64_t f : factors)
    if (!MulOk(p, f, &p)) return false;
  *out = p;
  return true;
}

// "a * b * c" for the error message of a product that does not fit.
inline std::string ProductString(std::initializer_list<int64_t> factors) {
  std::string s;
  for (int64_t f : factors) s += (s.empty() ? "" : " * ") + std::to_string(f);
  return s;
}

// The product of `factors`; throws E{"<what> = a * b * c does not fit int64"} on overflow
// (E: the op's error type, constructible from a std::string).
template <class E>
int64_t CheckedProduct(const char* what, std::initializer_list<int64_t> factors) {
  int64_t p = 0;
  if (!ProductOk(factors, &p)) throw E{std::string(what) + " = " + ProductString(factors) + " does not fit int64"};
  return p;
}

}  // namespace mfconvert
