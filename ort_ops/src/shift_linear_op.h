// The ShiftLinear custom op (docs/ops.md#shiftlinear): its ORT registration and kernel.
#pragma once

#include <memory>
#include <string>

#include "aligned_buffer.h"
#include "cpu_isa.h"
#include "ort_api.h"
#include "shift_linear_pack.h"

namespace mfconvert {

class ShiftLinearKernel {
 public:
  // Reads and checks the attributes; packs the weights once if they are initializers.
  // Throws Ort::Exception naming the node.
  ShiftLinearKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);
  [[noreturn]] void Fail(const std::string& what) const;

  std::string node_;
  ShiftLinearAttrs attrs_;
  Isa isa_ = Isa::kScalar;
  std::unique_ptr<PackedShiftLinear> packed_;  // null: weights are packed on every Compute
  ScratchPool scratch_;                          // the kernels' activation buffers
};

struct ShiftLinearOp : Ort::CustomOpBase<ShiftLinearOp, ShiftLinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return "ShiftLinear"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace mfconvert
