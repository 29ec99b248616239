// Runs loop bodies on ONNX Runtime's intra-op thread pool (so the session's thread settings
// apply). Tasks are handed out one index at a time, i.e. dynamically balanced.
#pragma once

#include <cstddef>
#include <type_traits>

#include "ort_api.h"

namespace mfconvert {

class Parallel {
 public:
  // ctx may be null: everything then runs on the calling thread.
  explicit Parallel(const OrtKernelContext* ctx) : ctx_(ctx) {}

  // Calls body(i) for i in [0, n); body must not throw.
  template <class Body>
  void For(size_t n, const Body& body) const {
    if (n == 0) return;
    if (n == 1 || ctx_ == nullptr) {
      for (size_t i = 0; i < n; ++i) body(i);
      return;
    }
    auto trampoline = [](void* data, size_t i) { (*static_cast<const Body*>(data))(i); };
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(
        ctx_, trampoline, n, 0, const_cast<void*>(static_cast<const void*>(&body))));
  }

 private:
  const OrtKernelContext* ctx_;
};

}  // namespace mfconvert
