// Kernel entry points as ORT statuses: a failure becomes one message naming the op and the node,
// never an exception through the C API. Used by the conv and spatial-shift kernels.
#pragma once

#include <exception>
#include <string>

#include "ort_api.h"

namespace mfconvert {

// ComputeV2's body: `DomainError` (a struct with `message`) is the kernel's own input error.
template <class DomainError, class Body>
OrtStatusPtr ComputeStatus(const std::string& prefix, Body&& body) noexcept {
  try {
    body();
  } catch (const DomainError& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (prefix + e.message).c_str());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (prefix + e.what()).c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (prefix + e.what()).c_str());
  }
  return nullptr;
}

// CreateKernelV2's body: the kernel's constructor already names the node in an Ort::Exception.
// `first` are the constructor's arguments before `info` (ShiftLinear's kernel takes the api).
template <class Kernel, class... First>
OrtStatusPtr CreateKernelStatus(const OrtApi& api, const OrtKernelInfo* info, void** kernel, const char* op,
                                const First&... first) noexcept {
  try {
    *kernel = new Kernel(first..., info);
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    std::string name = "?";
    try { name = Ort::ConstKernelInfo(info).GetNodeName(); } catch (...) {}
    return api.CreateStatus(ORT_FAIL, (std::string(op) + " node '" + name + "': " + e.what()).c_str());
  }
  return nullptr;
}

}  // namespace mfconvert
