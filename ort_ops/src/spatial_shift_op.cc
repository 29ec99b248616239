// The SpatialShift custom op (docs/ops.md#spatialshift): attribute and shape checks (errors name
// the node), overflow-checked sizes, the fused tail's inputs (scale, bias) and attributes
// (activation, clip_min, clip_max), the task split, and the scalar plane kernel (the SIMD ones:
// spatial_shift_avx2.cc, spatial_shift_avx512.cc). Without the tail no arithmetic touches the
// floats: Y is bit-exact by construction.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "op_status.h"
#include "shift_conv_common.h"
#include "spatial_shift.h"
#include "spatial_shift_rows.h"

namespace mfconvert {

namespace {

constexpr int64_t kMaxStride = int64_t{1} << 16;

std::string Shape(const std::vector<int64_t>& s) { return ConvShapeString(s); }

// Optional input `index` (scale or bias): null when absent, else float32 [C].
const float* PerChannel(Ort::KernelContext& ctx, size_t index, const std::string& what, int64_t c) {
  if (ctx.GetInputCount() <= index) return nullptr;
  const Ort::ConstValue v = ctx.GetInput(index);
  if (static_cast<const OrtValue*>(v) == nullptr) return nullptr;
  if (!v.IsTensor()) throw ConvError{what + " is not a tensor"};
  const auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw ConvError{what + " must be float32"};
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] != c)
    throw ConvError{what + " must have shape [" + std::to_string(c) + "] (C = X's channels), got " + Shape(shape)};
  return v.GetTensorData<float>();
}

class SpatialShiftKernel {
 public:
  SpatialShiftKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    node_ = ki.GetNodeName();
    try {
      attrs_.Read(info, "");
      std::string err;
      if (!SelectIsa(&isa_, &err)) throw ConvError{err};
    } catch (const ConvError& e) {
      Fail(e.message);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return ComputeStatus<ConvError>(Message(""), [&] { Compute(context); });
  }

  std::string Message(const std::string& what) const { return "SpatialShift node '" + node_ + "': " + what; }
  [[noreturn]] void Fail(const std::string& what) const { throw Ort::Exception(Message(what), ORT_INVALID_ARGUMENT); }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0);
    const auto xi = x.GetTensorTypeAndShapeInfo();
    if (xi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw ConvError{"X must be float32"};
    const int64_t* offsets = nullptr;
    const SpatialShiftGeom g = SpatialShiftMakeGeom(attrs_, xi.GetShape(), ctx, 1, "", &offsets);
    Ort::UnownedValue y = ctx.GetOutput(0, std::vector<int64_t>{g.n, g.c, g.oh, g.ow});
    if (g.n * g.c * g.h * g.w == 0 || g.oh * g.ow == 0) return;
    SpatialShiftRun(g, offsets, x.GetTensorData<float>(), y.GetTensorMutableData<float>(), Parallel(context), isa_);
  }

  std::string node_;
  SpatialShiftAttrs attrs_;
  Isa isa_ = Isa::kScalar;
};

struct SpatialShiftOp : Ort::CustomOpBase<SpatialShiftOp, SpatialShiftKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return CreateKernelStatus<SpatialShiftKernel>(api, info, kernel, "SpatialShift");
  }
  const char* GetName() const { return "SpatialShift"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// An offset clamped to [-(size + stride), size + stride]: every read it gives is the same (all
// outside, or the same edge pixel), and i * stride + offset cannot overflow.
inline int64_t Clamp(int64_t offset, int64_t size, int64_t stride) {
  const int64_t bound = size + stride;
  return std::min(std::max(offset, -bound), bound);
}

// Output floats per task, and below which a run stays on the calling thread: waking a pool
// thread (spinning off) costs more than a plane of 960×7×7 takes to write (BENCHMARKS.md).
constexpr int64_t kTaskFloats = 16384;
constexpr int64_t kSerialFloats = 65536;

}  // namespace

void SpatialShiftAttrs::Read(const OrtKernelInfo* info, const std::string& prefix) {
  const std::string n_strides = prefix + "strides", n_padding = prefix + "padding",
                    n_channel_shift = prefix + "channel_shift", n_activation = prefix + "activation",
                    n_min = prefix + "clip_min", n_max = prefix + "clip_max";
  bool present = false;
  std::vector<int64_t> strides = conv_detail::ReadInts(info, n_strides.c_str(), &present);
  any_present = present;
  if (!present) strides = {1, 1};
  if (strides.size() != 2) throw ConvError{"attribute " + n_strides + " " + Shape(strides) + " must have 2 values"};
  for (int64_t s : strides)
    if (s < 1 || s > kMaxStride)
      throw ConvError{"attribute " + n_strides + " " + Shape(strides) + " must be in [1, " + std::to_string(kMaxStride) + "]"};
  sh = strides[0];
  sw = strides[1];
  std::string padding = "zeros";
  std::string err = ReadStringAttr(info, n_padding.c_str(), &padding, &present);
  if (!err.empty()) throw ConvError{err};
  any_present |= present;
  if (!present) padding = "zeros";
  if (padding != "zeros" && padding != "edge")
    throw ConvError{"attribute " + n_padding + "='" + padding + "' must be 'zeros' or 'edge'"};
  edge = padding == "edge";
  err = ReadIntAttr(info, n_channel_shift.c_str(), &channel_shift, &present);
  if (!err.empty()) throw ConvError{err};
  any_present |= present;
  if (!present) channel_shift = 0;
  // activation '' | 'Relu' | 'Clip' with clip_min/clip_max, as ShiftConv's (docs/ops.md).
  bool has_min = false, has_max = false;
  std::string name;
  err = ReadStringAttr(info, n_activation.c_str(), &name, &present);
  if (!err.empty()) throw ConvError{err};
  any_present |= present;
  if (!present) name.clear();
  const float min_v = conv_detail::ReadFloat(info, n_min.c_str(), -std::numeric_limits<float>::infinity(), &has_min);
  const float max_v = conv_detail::ReadFloat(info, n_max.c_str(), std::numeric_limits<float>::infinity(), &has_max);
  any_present |= has_min || has_max;
  if (name == "Relu") {
    clip = true;
    lo = 0.0f;
  } else if (name == "Clip") {
    if (std::isnan(min_v) || std::isnan(max_v) || min_v > max_v)
      throw ConvError{"attributes " + n_min + "=" + std::to_string(min_v) + ", " + n_max + "=" + std::to_string(max_v) +
                      " must be numbers with " + n_min + " <= " + n_max};
    clip = true;
    lo = min_v;
    hi = max_v;
  } else if (!name.empty()) {
    throw ConvError{"attribute " + n_activation + "='" + name + "' is not one of '', 'Relu', 'Clip'"};
  }
  if ((has_min || has_max) && name != "Clip")
    throw ConvError{"attributes " + n_min + "/" + n_max + " are only allowed with " + n_activation + "='Clip'"};
}

SpatialShiftGeom SpatialShiftMakeGeom(const SpatialShiftAttrs& a, const std::vector<int64_t>& xs,
                                      Ort::KernelContext& ctx, size_t first_input, const std::string& prefix,
                                      const int64_t** offsets) {
  if (xs.size() != 4) throw ConvError{"X must have rank 4 [N, C, H, W], got " + Shape(xs)};
  SpatialShiftGeom g;
  g.n = xs[0];
  g.c = xs[1];
  g.h = xs[2];
  g.w = xs[3];
  g.sh = a.sh;
  g.sw = a.sw;
  g.edge = a.edge;
  int64_t size = 0;
  if (!ProductOk({g.n, g.c, g.h, g.w}, &size)) throw ConvError{"X size " + ProductString({g.n, g.c, g.h, g.w}) + " does not fit int64"};
  // ceil(H / sh) without H + sh - 1 overflowing
  g.oh = g.h == 0 ? 0 : (g.h - 1) / g.sh + 1;
  g.ow = g.w == 0 ? 0 : (g.w - 1) / g.sw + 1;
  if (g.ow > 0) {
    g.lane_rows = 16 / g.ow;
    g.lane_cols = 16 % g.ow;
  }
  const std::string name = prefix + "offsets";
  if (ctx.GetInputCount() <= first_input) throw ConvError{name + " is missing"};
  const Ort::ConstValue off = ctx.GetInput(first_input);
  if (static_cast<const OrtValue*>(off) == nullptr) throw ConvError{name + " is missing"};
  if (!off.IsTensor()) throw ConvError{name + " is not a tensor"};
  const auto oi = off.GetTensorTypeAndShapeInfo();
  if (oi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) throw ConvError{name + " must be int64"};
  const std::vector<int64_t> os = oi.GetShape();
  if (os.size() != 2 || os[0] != g.c || os[1] != 2)
    throw ConvError{name + " must have shape [" + std::to_string(g.c) + ", 2] (C = X's channels; dy, dx), got " + Shape(os)};
  // (c - channel_shift) mod C, in [0, C), for any int64 channel_shift
  g.channel_shift = g.c == 0 ? 0 : ((a.channel_shift % g.c) + g.c) % g.c;
  g.scale = PerChannel(ctx, first_input + 1, prefix + "scale", g.c);
  g.bias = PerChannel(ctx, first_input + 2, prefix + "bias", g.c);
  g.clip = a.clip;
  g.lo = a.lo;
  g.hi = a.hi;
  *offsets = off.GetTensorData<int64_t>();
  return g;
}

SpatialShiftPlaneFn SpatialShiftPlaneKernel(Isa isa) {
  return isa == Isa::kAvx512 ? SpatialShiftPlaneAvx512 : isa == Isa::kAvx2 ? SpatialShiftPlaneAvx2 : SpatialShiftPlaneScalar;
}

ShiftPlane SpatialShiftPlaneOf(const SpatialShiftGeom& g, const int64_t* offsets, const float* xn, int64_t c, float* y) {
  const int64_t src_c = (c + g.c - g.channel_shift) % g.c;
  return ShiftPlane{xn + src_c * g.h * g.w, y, Clamp(offsets[2 * c], g.h, g.sh), Clamp(offsets[2 * c + 1], g.w, g.sw),
                    g.scale ? g.scale[c] : 1.0f, g.bias ? g.bias[c] : 0.0f};
}

// Portable: the spec's formula per element; memcpy for the plain shift at stride 1.
void SpatialShiftPlaneScalar(const SpatialShiftGeom& g, const ShiftPlane& p) {
  const bool plain = !g.scale && !g.bias && !g.clip;
  spatial_shift_detail::Rows(g, p, [&](float* yr, const float* xr, int64_t j0, int64_t j1, float zero) {
    std::fill(yr, yr + j0, g.edge ? ShiftAffine(g, p, xr[0]) : zero);
    if (plain && g.sw == 1) {
      if (j1 > j0) std::memcpy(yr + j0, xr + j0 + p.dx, static_cast<size_t>(j1 - j0) * sizeof(float));
    } else {
      for (int64_t j = j0; j < j1; ++j) yr[j] = ShiftAffine(g, p, xr[j * g.sw + p.dx]);
    }
    std::fill(yr + j1, yr + g.ow, g.edge ? ShiftAffine(g, p, xr[g.w - 1]) : zero);
  });
}

void SpatialShiftRun(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y,
                     const Parallel& par, Isa isa) {
  const int64_t plane = g.h * g.w, out_plane = g.oh * g.ow, planes = g.n * g.c;
  SpatialShiftGeom geom = g;
  geom.lane_rows = 16 / g.ow;
  geom.lane_cols = 16 % g.ow;
  const SpatialShiftPlaneFn kernel = SpatialShiftPlaneKernel(isa);
  // Tasks of whole planes, ~16K output floats each (a 7×7 plane alone is too little to hand
  // out); a run of up to 64K output floats is one task (planes * out_plane fits: Y's size).
  const int64_t total = planes * out_plane;
  const int64_t per_task = total <= kSerialFloats ? planes
      : std::max<int64_t>(1, std::min<int64_t>(planes, kTaskFloats / std::max<int64_t>(out_plane, 1)));
  const int64_t tasks = (planes + per_task - 1) / per_task;
  par.For(static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t first = static_cast<int64_t>(t) * per_task, last = std::min(planes, first + per_task);
    // plane q = n * C + c and its source channel, stepped without a division per plane
    int64_t n = first / g.c, c = first % g.c, src_c = (c + g.c - g.channel_shift) % g.c;
    for (int64_t q = first; q < last; ++q) {
      const ShiftPlane p{x + (n * g.c + src_c) * plane, y + q * out_plane, Clamp(offsets[2 * c], g.h, g.sh),
                         Clamp(offsets[2 * c + 1], g.w, g.sw), g.scale ? g.scale[c] : 1.0f,
                         g.bias ? g.bias[c] : 0.0f};
      kernel(geom, p);
      if (++src_c == g.c) src_c = 0;
      if (++c == g.c) {
        c = 0;
        ++n;
      }
    }
  });
}

const OrtCustomOp* SpatialShiftCustomOp() {
  static const SpatialShiftOp op;
  return &op;
}

}  // namespace mfconvert
