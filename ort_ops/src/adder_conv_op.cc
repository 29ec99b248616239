// The AdderConv custom op (docs/ops.md#adderconv): attribute and shape checks (errors name the
// node), W quantised once when it is an initializer, the portable kernel, and the dispatch to the
// SIMD kernels (which fall back to the portable one when int32 lanes cannot hold a difference).
#include <memory>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "op_status.h"
#include "shift_conv.h"

namespace mfconvert {

namespace {

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another type";
  }
}

// Checks W ([M, C/G, kernel...]) and B ([M]) against the attributes; returns C/G.
int64_t CheckWeights(const ConvAttrs& a, const Ort::ConstValue& w, const Ort::ConstValue& b) {
  if (!w.IsTensor()) throw ConvError{"W is not a tensor"};
  const auto info = w.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw ConvError{std::string("W must be float32, got ") + TypeName(info.GetElementType())};
  const std::vector<int64_t> s = info.GetShape();
  bool ok = s.size() == a.kernel.size() + 2 && s[0] == a.out_channels && s[1] >= 1;
  for (size_t i = 0; ok && i < a.kernel.size(); ++i) ok = s[i + 2] == a.kernel[i];
  if (!ok)
    throw ConvError{"W must be [out_channels=" + std::to_string(a.out_channels) + ", C/group" +
                    std::string(a.kernel.size() == 1 ? ", k" : ", kh, kw") + "] with kernel_shape " +
                    ConvShapeString(a.kernel) + ", got " + ConvShapeString(s)};
  if (static_cast<const OrtValue*>(b) != nullptr) {
    if (!b.IsTensor()) throw ConvError{"B is not a tensor"};
    const auto bi = b.GetTensorTypeAndShapeInfo();
    if (bi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw ConvError{std::string("B must be float32, got ") + TypeName(bi.GetElementType())};
    if (bi.GetShape() != std::vector<int64_t>{a.out_channels})
      throw ConvError{"B must have shape [" + std::to_string(a.out_channels) + "], got " + ConvShapeString(bi.GetShape())};
  }
  int64_t k = 1;
  for (int64_t x : a.kernel) k = CheckedProduct<ConvError>("K", {k, x});
  int64_t reduce = 0;
  if (!ProductOk({s[1], k}, &reduce) || reduce > kConvMaxReduce)
    throw ConvError{"(C/group) * K = " + ProductString({s[1], k}) + " is above 2^22"};
  return s[1];
}

std::shared_ptr<const PackedAdderConv> Pack(const ConvAttrs& a, int act_bits, int act_frac_bits,
                                            const Ort::ConstValue& w, const Ort::ConstValue& b) {
  const int64_t cg = CheckWeights(a, w, b);
  auto p = std::make_shared<PackedAdderConv>();
  p->cg = cg;
  p->m = a.out_channels;
  p->k = 1;
  for (int64_t x : a.kernel) p->k *= x;
  p->quant = ActQuant::Make(act_bits, act_frac_bits);
  p->unscale = std::ldexp(1.0f, -act_frac_bits);
  const int64_t n = p->m * cg * p->k, row = cg * p->k;
  const float* wd = w.GetTensorData<float>();
  p->wq.resize(static_cast<size_t>(n));
  p->wmin.assign(p->m, 0);
  p->wmax.assign(p->m, 0);
  for (int64_t o = 0; o < p->m; ++o) {
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int64_t i = 0; i < row; ++i) {
      const int32_t q = ConvQuantize(wd[o * row + i], p->quant);
      p->wq[o * row + i] = q;
      mn = std::min(mn, q);
      mx = std::max(mx, q);
    }
    p->wmin[o] = mn;
    p->wmax[o] = mx;
  }
  p->bias.assign(p->m, 0.0f);
  if (static_cast<const OrtValue*>(b) != nullptr) {
    const float* bd = b.GetTensorData<float>();
    for (int64_t o = 0; o < p->m; ++o) p->bias[o] = bd[o];
  }
  return p;
}

class AdderConvKernel {
 public:
  AdderConvKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    node_ = ki.GetNodeName();
    try {
      conv_.Read(info);
      auto read = [&](const char* name, int64_t def, int64_t lo, int64_t hi) {
        int64_t x = def;
        bool present = false;
        const std::string err = ReadIntAttr(info, name, &x, &present);
        if (!err.empty()) throw ConvError{err};
        if (!present) x = def;
        if (x < lo || x > hi)
          throw ConvError{std::string("attribute ") + name + "=" + std::to_string(x) + " is outside [" +
                          std::to_string(lo) + ", " + std::to_string(hi) + "]"};
        return static_cast<int>(x);
      };
      act_bits_ = read("act_bits", 32, 2, 32);
      act_frac_bits_ = read("act_frac_bits", 16, -32, 32);
      std::string err;
      if (!SelectIsa(&isa_, &err)) throw ConvError{err};
      const size_t n_inputs = ki.GetInputCount();
      int c1 = 0, c2 = 1;
      Ort::ConstValue w = ki.GetTensorConstantInput(1, &c1);
      Ort::ConstValue b{nullptr};
      if (n_inputs > 2) {
        try {
          b = ki.GetTensorConstantInput(2, &c2);
        } catch (const Ort::Exception&) {
          c2 = 0;
          b = Ort::ConstValue{nullptr};
        }
        if (static_cast<const OrtValue*>(b) == nullptr && ki.GetInputName(2).empty()) c2 = 1;
      }
      if (c1 && c2) packed_ = Pack(conv_, act_bits_, act_frac_bits_, w, b);
    } catch (const ConvError& e) {
      Fail(e.message);
    } catch (const Ort::Exception& e) {
      Fail(e.what());
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return ComputeStatus<ConvError>(Message(""), [&] { Compute(context); });
  }

  std::string Message(const std::string& what) const { return "AdderConv node '" + node_ + "': " + what; }
  [[noreturn]] void Fail(const std::string& what) const { throw Ort::Exception(Message(what), ORT_INVALID_ARGUMENT); }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw ConvError{std::string("X must be float32, got ") + TypeName(x_info.GetElementType())};
    const ConvGeom g = ConvGeom::Make(conv_, x_info.GetShape());
    std::shared_ptr<const PackedAdderConv> p = packed_;
    if (!p) {
      const Ort::ConstValue b = ctx.GetInputCount() > 2 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
      p = Pack(conv_, act_bits_, act_frac_bits_, ctx.GetInput(1), b);
    }
    if (p->cg != g.cg)
      throw ConvError{"X has C=" + std::to_string(g.c) + " channels but W has C/group=" + std::to_string(p->cg) +
                      " with group=" + std::to_string(g.g) + " (C must be " + std::to_string(p->cg * g.g) + ")"};
    Ort::UnownedValue y = ctx.GetOutput(0, g.y_shape);
    if (g.n == 0 || g.oh * g.ow == 0) return;
    const float* xd = x.GetTensorData<float>();
    float* yd = y.GetTensorMutableData<float>();
    const Parallel par(context);
    if (isa_ != Isa::kScalar && ConvPlanesPay(g)) {
      AdderConvRun run{p.get(), g, ConvPlanes::Make(g, 1, 128), conv_.act, nullptr};
      std::vector<int64_t> tap(static_cast<size_t>(p->k));
      for (int64_t u = 0; u < g.kh; ++u)
        for (int64_t v = 0; v < g.kw; ++v) tap[u * g.kw + v] = run.planes.TapOffset(g, u, v);
      std::vector<AdderConvEntry> entries(static_cast<size_t>(p->m * p->cg * p->k));
      for (int64_t o = 0, j = 0; o < p->m; ++o)
        for (int64_t c = 0; c < p->cg; ++c)
          for (int64_t i = 0; i < p->k; ++i, ++j)
            entries[j] = AdderConvEntry{c * run.planes.channel + tap[i], p->wq[j], 0};
      run.entries = entries.data();
      ScratchPool::Lease scratch(scratch_);
      const bool done = isa_ == Isa::kAvx512 ? AdderConvAvx512(run, xd, yd, par, scratch.buffer())
                                              : AdderConvAvx2(run, xd, yd, par, scratch.buffer());
      if (done) return;
    }
    AdderConvScalar(*p, g, conv_.act, xd, yd, par);
  }

  std::string node_;
  ConvAttrs conv_;
  int act_bits_ = 32, act_frac_bits_ = 16;
  Isa isa_ = Isa::kScalar;
  std::shared_ptr<const PackedAdderConv> packed_;  // null: W (or B) is not an initializer
  ScratchPool scratch_;
};

struct AdderConvOp : Ort::CustomOpBase<AdderConvOp, AdderConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return CreateKernelStatus<AdderConvKernel>(api, info, kernel, "AdderConv");
  }
  const char* GetName() const { return "AdderConv"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// Portable: the spec's formula per output element over the quantised image (int64 sums).
void AdderConvScalar(const PackedAdderConv& p, const ConvGeom& g, const ConvActivation& act,
                     const float* x, float* y, const Parallel& par) {
  const int64_t image = g.c * g.h * g.w, out_image = g.m * g.oh * g.ow, row = p.cg * p.k;
  std::vector<int32_t> xq(static_cast<size_t>(image));
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * image;
    par.For(static_cast<size_t>(g.c), [&](size_t c) {
      const int64_t base = static_cast<int64_t>(c) * g.h * g.w;
      for (int64_t i = 0; i < g.h * g.w; ++i) xq[base + i] = ConvQuantize(xn[base + i], p.quant);
    });
    par.For(static_cast<size_t>(g.m), [&](size_t oi) {
      const int64_t o = static_cast<int64_t>(oi), c0 = o / g.mg * g.cg;
      const int32_t* w = p.wq.data() + o * row;
      float* yo = y + n * out_image + o * g.oh * g.ow;
      for (int64_t oh = 0; oh < g.oh; ++oh) {
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          int64_t acc = 0;
          for (int64_t c = 0; c < p.cg; ++c) {
            const int32_t* plane = xq.data() + (c0 + c) * g.h * g.w;
            for (int64_t u = 0; u < g.kh; ++u) {
              const int64_t ih = oh * g.sh + u * g.dh - g.pt;
              const bool row_in = ih >= 0 && ih < g.h;
              for (int64_t v = 0; v < g.kw; ++v) {
                const int64_t iw = ow * g.sw + v * g.dw - g.pl;
                const int64_t xv = row_in && iw >= 0 && iw < g.w ? plane[ih * g.w + iw] : 0;  // padding: 0
                const int64_t d = xv - w[c * p.k + u * g.kw + v];
                acc += d < 0 ? -d : d;
              }
            }
          }
          yo[oh * g.ow + ow] = act.Apply(p.bias[o] - static_cast<float>(acc) * p.unscale);
        }
      }
    });
  }
}

const OrtCustomOp* AdderConvCustomOp() {
  static const AdderConvOp op;
  return &op;
}

}  // namespace mfconvert
