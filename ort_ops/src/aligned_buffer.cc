#include "aligned_buffer.h"

namespace mfconvert {

AlignedBuffer ScratchPool::Take() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (free_.empty()) return AlignedBuffer();
  AlignedBuffer b = std::move(free_.back());
  free_.pop_back();
  return b;
}

void ScratchPool::Give(AlignedBuffer buffer) noexcept {
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(buffer));
  } catch (...) {
    // No room to keep it: the buffer is freed here instead.
  }
}

}  // namespace mfconvert
