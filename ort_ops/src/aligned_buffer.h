// A 64-byte aligned, uninitialised, growable scratch buffer.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

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

// The scratch buffers of one kernel: a Compute takes one for its duration (Computes of one
// session may run concurrently) and gives it back for the next; they are freed with the kernel,
// i.e. with the session (a thread-local buffer outlived it).
class ScratchPool {
 public:
  class Lease {
   public:
    explicit Lease(ScratchPool& pool) : pool_(pool), buffer_(pool.Take()) {}
    ~Lease() { pool_.Give(std::move(buffer_)); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    AlignedBuffer& buffer() { return buffer_; }

   private:
    ScratchPool& pool_;
    AlignedBuffer buffer_;
  };

 private:
  AlignedBuffer Take();
  void Give(AlignedBuffer buffer) noexcept;

  std::mutex mutex_;
  std::vector<AlignedBuffer> free_;
};

}  // namespace mfconvert
