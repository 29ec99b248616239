// Typed node attributes: an attribute that is absent takes its default, one of another type is
// an error (ORT's getters fail alike for both, so a failed read asks what the attribute is).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ort_api.h"

namespace mfconvert {

namespace attrs_detail {

inline bool Ok(OrtStatus* status) {
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

// What the attribute `name` is once reading it as `expected` failed: "" when absent, else
// "a float", "a string", ... (every getter of the C API is tried; a present attribute of a type
// none reads, such as a graph, is found by the failed read's message).
inline std::string Describe(const OrtKernelInfo* info, const char* name, OrtStatus* failed) {
  const OrtApi& api = Ort::GetApi();
  const std::string message = api.GetErrorMessage(failed);
  api.ReleaseStatus(failed);
  int64_t i = 0;
  float f = 0;
  size_t n = 0;
  if (Ok(api.KernelInfoGetAttribute_int64(info, name, &i))) return "an int";
  if (Ok(api.KernelInfoGetAttribute_float(info, name, &f))) return "a float";
  if (Ok(api.KernelInfoGetAttribute_string(info, name, nullptr, &n))) return "a string";
  n = 0;
  if (Ok(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) && n > 0) return "a list of ints";
  n = 0;
  if (Ok(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &n)) && n > 0) return "a list of floats";
  OrtAllocator* alloc = nullptr;
  OrtValue* tensor = nullptr;
  if (Ok(api.GetAllocatorWithDefaultOptions(&alloc)) &&
      Ok(api.KernelInfoGetAttribute_tensor(info, name, alloc, &tensor))) {
    api.ReleaseValue(tensor);
    return "a tensor";
  }
  // ORT: "No attribute with name:'x'is defined." (absent) vs "... type don't match" (present).
  if (message.find("No attribute") != std::string::npos) return "";
  return "another type";
}

}  // namespace attrs_detail

// Reads the int attribute `name`. Returns "" with *present set (and *value when present), or
// "attribute NAME must be an int, got a float" when it has another type.
inline std::string ReadIntAttr(const OrtKernelInfo* info, const char* name, int64_t* value, bool* present) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, value);
  *present = status == nullptr;
  if (*present) return {};
  const std::string got = attrs_detail::Describe(info, name, status);
  if (got.empty()) return {};
  return std::string("attribute ") + name + " must be an int, got " + got;
}

// The same for a string attribute.
inline std::string ReadStringAttr(const OrtKernelInfo* info, const char* name, std::string* value, bool* present) {
  const OrtApi& api = Ort::GetApi();
  size_t n = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &n);
  if (status == nullptr) {
    std::vector<char> buf(n + 1, '\0');
    status = api.KernelInfoGetAttribute_string(info, name, buf.data(), &n);
    if (status == nullptr) {
      *present = true;
      *value = std::string(buf.data(), strnlen(buf.data(), buf.size()));
      return {};
    }
  }
  *present = false;
  const std::string got = attrs_detail::Describe(info, name, status);
  if (got.empty()) return {};
  return std::string("attribute ") + name + " must be a string, got " + got;
}

}  // namespace mfconvert
