#include "shift_linear_op.h"

#include <climits>
#include <vector>

#include "attrs.h"
#include "checked.h"
#include "custom_ops.h"
#include "op_status.h"
#include "shift_linear_kernels.h"

namespace mfconvert {

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + "]";
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another type";
  }
}

// Checks one weight input: type and exact 1-D shape [length]. Returns what is wrong, or "".
std::string CheckVector(const Ort::ConstValue& v, const char* name, ONNXTensorElementDataType type,
                        int64_t length) {
  if (!v.IsTensor()) return std::string(name) + " is not a tensor";
  const auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    return std::string(name) + " must be " + TypeName(type) + ", got " + TypeName(info.GetElementType());
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] != length)
    return std::string(name) + " must have shape [" + std::to_string(length) + "], got " +
           ShapeString(shape);
  return {};
}

// Validates W_codes, W_exponent and B (bias may be empty) and packs them into `out`.
std::string CheckAndPack(const ShiftLinearAttrs& a, Isa isa, const Ort::ConstValue& codes,
                         const Ort::ConstValue& exponent, const Ort::ConstValue& bias,
                         PackedShiftLinear* out) {
  int64_t bits_total = 0;
  if (!ProductOk({a.terms, a.out_features, a.in_features, a.weight_bits}, &bits_total) || bits_total > INT64_MAX - 7)
    return "W_codes length terms * out_features * in_features * weight_bits = " +
           ProductString({a.terms, a.out_features, a.in_features, a.weight_bits}) + " bits does not fit int64";
  const int64_t n_codes = (bits_total + 7) / 8;
  std::string err = CheckVector(codes, "W_codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, n_codes);
  if (!err.empty()) {
    return err + " (ceil(terms * out_features * in_features * weight_bits / 8) = ceil(" +
           std::to_string(a.terms) + " * " + std::to_string(a.out_features) + " * " +
           std::to_string(a.in_features) + " * " + std::to_string(a.weight_bits) + " / 8))";
  }
  err = CheckVector(exponent, "W_exponent", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, a.out_features);
  if (!err.empty()) return err;
  const bool has_bias = static_cast<const OrtValue*>(bias) != nullptr;
  if (has_bias) {
    err = CheckVector(bias, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, a.out_features);
    if (!err.empty()) return err;
  }
  return PackShiftLinear(a, isa, codes.GetTensorData<uint8_t>(), exponent.GetTensorData<int8_t>(),
                         has_bias ? bias.GetTensorData<float>() : nullptr, out);
}

}  // namespace

void ShiftLinearKernel::Fail(const std::string& what) const {
  throw Ort::Exception("ShiftLinear node '" + node_ + "': " + what, ORT_INVALID_ARGUMENT);
}

ShiftLinearKernel::ShiftLinearKernel(const OrtApi& api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  node_ = ki.GetNodeName();
  // An int attribute: absent gives `def` (required: an error), another type is an error.
  auto read = [&](const char* name, int64_t def, bool required) {
    int64_t x = def;
    bool present = false;
    const std::string err = ReadIntAttr(info, name, &x, &present);
    if (!err.empty()) Fail(err);
    if (!present && required) Fail(std::string("missing required attribute ") + name);
    return present ? x : def;
  };
  attrs_.in_features = read("in_features", 0, true);
  attrs_.out_features = read("out_features", 0, true);
  // Narrow only after the range check (CheckAttrs), so huge values cannot wrap into range.
  auto narrow = [&](const char* name, int64_t def, int* dst) {
    const int64_t x = read(name, def, false);
    if (x < -1024 || x > 1024) Fail(std::string("attribute ") + name + "=" + std::to_string(x) + " is out of range");
    *dst = static_cast<int>(x);
  };
  narrow("weight_bits", 5, &attrs_.weight_bits);
  narrow("act_bits", 32, &attrs_.act_bits);
  narrow("act_frac_bits", 16, &attrs_.act_frac_bits);
  narrow("terms", 1, &attrs_.terms);
  std::string err = CheckAttrs(attrs_);
  if (!err.empty()) Fail(err);
  if (!SelectIsa(&isa_, &err)) Fail(err);

  // Pack once when W_codes, W_exponent (and B, if given) are constant initializers.
  const size_t n_inputs = ki.GetInputCount();
  int c1 = 0, c2 = 0, c3 = 1;
  Ort::ConstValue codes = ki.GetTensorConstantInput(1, &c1);
  Ort::ConstValue exponent = ki.GetTensorConstantInput(2, &c2);
  Ort::ConstValue bias{nullptr};
  if (n_inputs > 3) {
    try {
      bias = ki.GetTensorConstantInput(3, &c3);
    } catch (const Ort::Exception&) {
      c3 = 0;  // an absent optional input
      bias = Ort::ConstValue{nullptr};
    }
    // An empty name ("") is an absent optional input: no value, and constant for our purpose.
    if (static_cast<const OrtValue*>(bias) == nullptr && ki.GetInputName(3).empty()) c3 = 1;
  }
  if (c1 && c2 && c3) {
    packed_ = std::make_unique<PackedShiftLinear>();
    err = CheckAndPack(attrs_, isa_, codes, exponent, bias, packed_.get());
    if (!err.empty()) Fail(err);
  }
}

void ShiftLinearKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const Ort::ConstValue x = ctx.GetInput(0);
  const auto x_info = x.GetTensorTypeAndShapeInfo();
  if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    Fail(std::string("X must be float32, got ") + TypeName(x_info.GetElementType()));
  std::vector<int64_t> shape = x_info.GetShape();
  if (shape.empty()) Fail("X must have rank >= 1, got a scalar");
  if (shape.back() != attrs_.in_features)
    Fail("last dimension of X " + ShapeString(shape) + " must be in_features=" +
         std::to_string(attrs_.in_features));
  // rows = the product of the leading dims (0 if any is 0; a product that wraps is an error).
  int64_t rows = 1;
  bool empty = false;
  for (size_t k = 0; k + 1 < shape.size(); ++k) empty |= shape[k] == 0;
  for (size_t k = 0; k + 1 < shape.size() && !empty; ++k)
    if (shape[k] < 0 || !MulOk(rows, shape[k], &rows)) Fail("X " + ShapeString(shape) + " has more rows than fit int64");
  if (empty) rows = 0;
  int64_t y_size = 0, wide_size = 0;
  if (!ProductOk({rows, attrs_.out_features}, &y_size) || !ProductOk({rows, attrs_.in_features, attrs_.terms}, &wide_size))
    Fail("X " + ShapeString(shape) + ": rows * out_features or rows * terms * in_features does not fit int64");

  PackedShiftLinear local;
  const PackedShiftLinear* p = packed_.get();
  if (p == nullptr) {
    const Ort::ConstValue bias =
        ctx.GetInputCount() > 3 ? ctx.GetInput(3) : Ort::ConstValue{nullptr};
    const std::string err = CheckAndPack(attrs_, isa_, ctx.GetInput(1), ctx.GetInput(2), bias, &local);
    if (!err.empty()) Fail(err);
    p = &local;
  }

  shape.back() = attrs_.out_features;
  Ort::UnownedValue y = ctx.GetOutput(0, shape);
  if (rows == 0) return;
  const float* xd = x.GetTensorData<float>();
  std::vector<float> wide;  // with terms > 1 the packed weights read X repeated along each row
  if (attrs_.terms > 1 && p->lut_terms == 1) {  // (AVX-512 reads X as it is)
    WidenRows(xd, rows, attrs_.in_features, attrs_.terms, &wide);
    xd = wide.data();
  }
  float* yd = y.GetTensorMutableData<float>();
  const Parallel par(context);
  ScratchPool::Lease scratch(scratch_);
  switch (isa_) {
    case Isa::kAvx512: ShiftLinearAvx512(*p, xd, rows, yd, par, scratch.buffer()); break;
    case Isa::kAvx2: ShiftLinearAvx2(*p, xd, rows, yd, par, scratch.buffer()); break;
    case Isa::kScalar: ShiftLinearScalar(*p, xd, rows, yd, par); break;
  }
}

OrtStatusPtr ShiftLinearKernel::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Compute(context);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, ("ShiftLinear node '" + node_ + "': " + e.what()).c_str());
  }
  return nullptr;
}

OrtStatusPtr ShiftLinearOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                           void** kernel) const {
  return CreateKernelStatus<ShiftLinearKernel>(api, info, kernel, "ShiftLinear", api);
}

ONNXTensorElementDataType ShiftLinearOp::GetInputType(size_t index) const {
  switch (index) {
    case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

OrtCustomOpInputOutputCharacteristic ShiftLinearOp::GetInputCharacteristic(size_t index) const {
  return index == 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                    : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
}

const OrtCustomOp* ShiftLinearCustomOp() {
  static const ShiftLinearOp op;
  return &op;
}

}  // namespace mfconvert
