#include "aligned_buffer.h"

namespace mfconvert {

AlignedBuffer& ThreadScratch(int slot) {
  static thread_local AlignedBuffer buffers[2];
  return buffers[slot];
}

}  // namespace mfconvert
