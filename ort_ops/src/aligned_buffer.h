// A 64-byte aligned, uninitialised, growable scratch buffer.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace mfconvert {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = o.data_;
      size_ = o.size_;
      o.data_ = nullptr;
      o.size_ = 0;
    }
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  // Makes room for at least `bytes` bytes; the contents are not kept.
  void Reserve(size_t bytes) {
    if (bytes <= size_) return;
    std::free(data_);
    data_ = nullptr;
    size_ = 0;
    const size_t rounded = (bytes + 63) / 64 * 64;
    data_ = std::aligned_alloc(64, rounded);
    if (data_ == nullptr) throw std::bad_alloc();
    size_ = rounded;
  }

  template <class T>
  T* As() const { return static_cast<T*>(data_); }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A per-thread scratch buffer, reused across Compute calls of every ShiftLinear kernel run on
// that thread (Compute may run concurrently on different threads, never twice on one).
AlignedBuffer& ThreadScratch(int slot);

}  // namespace mfconvert
