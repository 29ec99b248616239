// The SpatialShift custom op (docs/ops.md#spatialshift): attribute and shape checks (errors name
// the node), overflow-checked sizes, and the kernel, which copies row segments (memcpy at stride 1)
// and writes the padding. No arithmetic on the floats: Y is bit-exact by construction.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "op_status.h"
#include "shift_conv_common.h"
#include "spatial_shift.h"

namespace mfconvert {

namespace {

constexpr int64_t kMaxStride = int64_t{1} << 16;

struct ShiftError {
  std::string message;
};

std::string Shape(const std::vector<int64_t>& s) { return ConvShapeString(s); }

class SpatialShiftKernel {
 public:
  SpatialShiftKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    node_ = ki.GetNodeName();
    try {
      bool present = false;
      std::vector<int64_t> strides = conv_detail::ReadInts(info, "strides", &present);
      if (!present) strides = {1, 1};
      if (strides.size() != 2) throw ShiftError{"attribute strides " + Shape(strides) + " must have 2 values"};
      for (int64_t s : strides)
        if (s < 1 || s > kMaxStride)
          throw ShiftError{"attribute strides " + Shape(strides) + " must be in [1, " + std::to_string(kMaxStride) + "]"};
      sh_ = strides[0];
      sw_ = strides[1];
      std::string padding = "zeros";
      std::string err = ReadStringAttr(info, "padding", &padding, &present);
      if (!err.empty()) throw ShiftError{err};
      if (!present) padding = "zeros";
      if (padding != "zeros" && padding != "edge")
        throw ShiftError{"attribute padding='" + padding + "' must be 'zeros' or 'edge'"};
      edge_ = padding == "edge";
      err = ReadIntAttr(info, "channel_shift", &channel_shift_, &present);
      if (!err.empty()) throw ShiftError{err};
      if (!present) channel_shift_ = 0;
    } catch (const ShiftError& e) {
      Fail(e.message);
    } catch (const ConvError& e) {
      Fail(e.message);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return ComputeStatus<ShiftError>(Message(""), [&] { Compute(context); });
  }

  std::string Message(const std::string& what) const { return "SpatialShift node '" + node_ + "': " + what; }
  [[noreturn]] void Fail(const std::string& what) const { throw Ort::Exception(Message(what), ORT_INVALID_ARGUMENT); }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0), off = ctx.GetInput(1);
    const auto xi = x.GetTensorTypeAndShapeInfo();
    if (xi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw ShiftError{"X must be float32"};
    const std::vector<int64_t> xs = xi.GetShape();
    if (xs.size() != 4) throw ShiftError{"X must have rank 4 [N, C, H, W], got " + Shape(xs)};
    SpatialShiftGeom g;
    g.n = xs[0];
    g.c = xs[1];
    g.h = xs[2];
    g.w = xs[3];
    g.sh = sh_;
    g.sw = sw_;
    g.edge = edge_;
    int64_t size = 0;
    if (!ProductOk({g.n, g.c, g.h, g.w}, &size)) throw ShiftError{"X size " + ProductString({g.n, g.c, g.h, g.w}) + " does not fit int64"};
    // ceil(H / sh) without H + sh - 1 overflowing
    g.oh = g.h == 0 ? 0 : (g.h - 1) / g.sh + 1;
    g.ow = g.w == 0 ? 0 : (g.w - 1) / g.sw + 1;
    if (!off.IsTensor()) throw ShiftError{"offsets is not a tensor"};
    const auto oi = off.GetTensorTypeAndShapeInfo();
    if (oi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) throw ShiftError{"offsets must be int64"};
    const std::vector<int64_t> os = oi.GetShape();
    if (os.size() != 2 || os[0] != g.c || os[1] != 2)
      throw ShiftError{"offsets must have shape [" + std::to_string(g.c) + ", 2] (C = X's channels; dy, dx), got " + Shape(os)};
    // (c - channel_shift) mod C, in [0, C), for any int64 channel_shift
    g.channel_shift = g.c == 0 ? 0 : ((channel_shift_ % g.c) + g.c) % g.c;
    Ort::UnownedValue y = ctx.GetOutput(0, std::vector<int64_t>{g.n, g.c, g.oh, g.ow});
    if (size == 0 || g.oh * g.ow == 0) return;
    SpatialShiftRun(g, off.GetTensorData<int64_t>(), x.GetTensorData<float>(), y.GetTensorMutableData<float>(),
                    Parallel(context));
  }

  std::string node_;
  int64_t sh_ = 1, sw_ = 1, channel_shift_ = 0;
  bool edge_ = false;
};

struct SpatialShiftOp : Ort::CustomOpBase<SpatialShiftOp, SpatialShiftKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return CreateKernelStatus<SpatialShiftKernel>(api, info, kernel, "SpatialShift");
  }
  const char* GetName() const { return "SpatialShift"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
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

constexpr int64_t kTaskFloats = 16384;

void Plane(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y, int64_t p, int64_t plane,
           int64_t out_plane);

}  // namespace

void SpatialShiftRun(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y,
                     const Parallel& par) {
  const int64_t plane = g.h * g.w, out_plane = g.oh * g.ow, planes = g.n * g.c;
  // Tasks of whole planes, ~16K output floats each (a 7×7 plane alone is too little to hand out).
  const int64_t per_task = std::max<int64_t>(1, std::min<int64_t>(planes, kTaskFloats / std::max<int64_t>(out_plane, 1)));
  const int64_t tasks = (planes + per_task - 1) / per_task;
  par.For(static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t first = static_cast<int64_t>(t) * per_task, last = std::min(planes, first + per_task);
    for (int64_t p = first; p < last; ++p) Plane(g, offsets, x, y, p, plane, out_plane);
  });
}

namespace {

// One output plane p = n * C + c.
void Plane(const SpatialShiftGeom& g, const int64_t* offsets, const float* x, float* y, int64_t p, int64_t plane,
           int64_t out_plane) {
  {
    const int64_t n = p / g.c, c = p % g.c;
    const int64_t src_c = (c + g.c - g.channel_shift) % g.c;
    const int64_t dy = Clamp(offsets[2 * c], g.h, g.sh), dx = Clamp(offsets[2 * c + 1], g.w, g.sw);
    const float* xp = x + (n * g.c + src_c) * plane;
    float* yp = y + (n * g.c + c) * out_plane;
    // Output columns [j0, j1) read inside the row: 0 <= j * sw + dx < W.
    const int64_t j0 = dx >= 0 ? 0 : std::min(g.ow, (-dx + g.sw - 1) / g.sw);
    const int64_t j1 = std::max(j0, std::min(g.ow, g.w - dx <= 0 ? 0 : (g.w - dx - 1) / g.sw + 1));
    for (int64_t i = 0; i < g.oh; ++i) {
      float* yr = yp + i * g.ow;
      int64_t r = i * g.sh + dy;
      if (r < 0 || r >= g.h) {
        if (!g.edge) {
          std::fill(yr, yr + g.ow, 0.0f);
          continue;
        }
        r = std::min(std::max(r, int64_t{0}), g.h - 1);
      }
      const float* xr = xp + r * g.w;
      std::fill(yr, yr + j0, g.edge ? xr[0] : 0.0f);
      if (g.sw == 1) {
        if (j1 > j0) std::memcpy(yr + j0, xr + j0 + dx, static_cast<size_t>(j1 - j0) * sizeof(float));
      } else {
        for (int64_t j = j0; j < j1; ++j) yr[j] = xr[j * g.sw + dx];
      }
      std::fill(yr + j1, yr + g.ow, g.edge ? xr[g.w - 1] : 0.0f);
    }
  }
}

}  // namespace

const OrtCustomOp* SpatialShiftCustomOp() {
  static const SpatialShiftOp op;
  return &op;
}

}  // namespace mfconvert
