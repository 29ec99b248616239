// The ShiftConv custom op (docs/ops.md#shiftconv): attribute and shape checks (errors name the
// node), the weights decoded once per channel count when they are initializers, the portable
// kernel, and the dispatch to the SIMD kernels.
#include <memory>
#include <mutex>
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
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another type";
  }
}

// A 1-D input of `type` and exactly `length` elements, else ConvError.
void CheckVector(const Ort::ConstValue& v, const char* name, ONNXTensorElementDataType type, int64_t length) {
  if (!v.IsTensor()) throw ConvError{std::string(name) + " is not a tensor"};
  const auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    throw ConvError{std::string(name) + " must be " + TypeName(type) + ", got " + TypeName(info.GetElementType())};
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] != length)
    throw ConvError{std::string(name) + " must have shape [" + std::to_string(length) + "], got " + ConvShapeString(shape)};
}

struct Format {
  int weight_bits = 5, act_bits = 32, act_frac_bits = 16, terms = 1;
};

// The B-bit code j of the LSB-first stream of n bytes.
inline unsigned CodeAt(const uint8_t* bytes, int64_t n, int64_t j, int bits) {
  const int64_t pos = j * bits, k = pos >> 3;
  unsigned v = bytes[k];
  if (k + 1 < n) v |= unsigned{bytes[k + 1]} << 8;
  return (v >> (pos & 7)) & ((1u << bits) - 1);
}

// Decodes codes [T][M][C/G][K] (stream order) into PackedShiftConv's [M][T][C/G][K].
void Pack(const Format& f, int64_t m, int64_t cg, int64_t k, const uint8_t* codes, int64_t n_bytes,
          const int8_t* exponent, const float* bias, PackedShiftConv* out) {
  PackedShiftConv& p = *out;
  p.cg = cg;
  p.m = m;
  p.k = k;
  p.terms = f.terms;
  p.quant = ActQuant::Make(f.act_bits, f.act_frac_bits);
  p.scale.assign(m, 1.0f);
  p.bias.assign(m, 0.0f);
  for (int64_t o = 0; o < m; ++o) {
    const int shift = int{exponent[o]} - f.act_frac_bits;
    if (shift < -126 || shift > 127)
      throw ConvError{"W_exponent[" + std::to_string(o) + "]=" + std::to_string(int{exponent[o]}) +
                      " minus act_frac_bits=" + std::to_string(f.act_frac_bits) + " is " + std::to_string(shift) +
                      ", outside [-126, 127]"};
    p.scale[o] = std::ldexp(1.0f, shift);
    if (bias != nullptr) p.bias[o] = bias[o];
  }
  const int bits = f.weight_bits;
  const unsigned zero = (1u << (bits - 1)) - 1;
  const int64_t per_term = m * cg * k, row = cg * k;
  p.codes.assign(static_cast<size_t>(per_term * f.terms), kZeroCode);
  for (int64_t t = 0; t < f.terms; ++t) {
    for (int64_t o = 0; o < m; ++o) {
      uint8_t* dst = p.codes.data() + (o * f.terms + t) * row;
      const int64_t j0 = t * per_term + o * row;
      for (int64_t i = 0; i < row; ++i) {
        const unsigned c = CodeAt(codes, n_bytes, j0 + i, bits);
        const unsigned s = c >> (bits - 1), sh = c & zero;
        if (sh != zero) dst[i] = static_cast<uint8_t>(s << 4 | sh);
      }
    }
  }
}

// The SIMD kernels' entries: per output o, one per non-zero code in order (c, tap, t), the
// positive ones first.
void BuildEntries(const PackedShiftConv& p, const ConvGeom& g, const ConvPlanes& pl,
                  std::vector<ShiftConvEntry>* entries, std::vector<int64_t>* begin, std::vector<int64_t>* split) {
  std::vector<int64_t> tap(static_cast<size_t>(p.k));
  for (int64_t u = 0; u < g.kh; ++u)
    for (int64_t v = 0; v < g.kw; ++v) tap[u * g.kw + v] = pl.TapOffset(g, u, v);
  entries->clear();
  begin->assign(static_cast<size_t>(p.m + 1), 0);
  split->assign(static_cast<size_t>(p.m), 0);
  const int64_t row = p.cg * p.k;
  for (int64_t o = 0; o < p.m; ++o) {
    (*begin)[o] = static_cast<int64_t>(entries->size());
    const uint8_t* codes = p.codes.data() + o * p.terms * row;
    for (unsigned sign = 0; sign < 2; ++sign) {
      if (sign == 1) (*split)[o] = static_cast<int64_t>(entries->size());
      for (int64_t c = 0; c < p.cg; ++c)
        for (int64_t i = 0; i < p.k; ++i)
          for (int t = 0; t < p.terms; ++t) {
            const uint8_t code = codes[t * row + c * p.k + i];
            if (code == kZeroCode || (code >> 4) != sign) continue;
            entries->push_back(ShiftConvEntry{c * pl.channel + tap[i], code & 15, 0});
          }
    }
  }
  (*begin)[p.m] = static_cast<int64_t>(entries->size());
}

class ShiftConvKernel {
 public:
  ShiftConvKernel(const OrtKernelInfo* info) {
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
      fmt_.weight_bits = read("weight_bits", 5, 2, 5);
      fmt_.act_bits = read("act_bits", 32, 2, 32);
      fmt_.act_frac_bits = read("act_frac_bits", 16, -32, 32);
      fmt_.terms = read("terms", 1, 1, kMaxTerms);
      // The optional input shift (docs/ops.md#input-shift-read-through): inputs 4-6 and the
      // shift_* attributes, SpatialShift's own checks under the prefix.
      shift_attrs_.Read(info, "shift_");
      const size_t named = ki.GetInputCount();
      has_shift_ = named > 4 && !ki.GetInputName(4).empty();
      if (!has_shift_) {
        const bool tail = (named > 5 && !ki.GetInputName(5).empty()) || (named > 6 && !ki.GetInputName(6).empty());
        if (shift_attrs_.any_present || tail)
          throw ConvError{"shift_* attributes and the inputs shift_scale, shift_bias need input 4 (shift_offsets)"};
      } else if (conv_.kernel.size() != 2) {
        throw ConvError{"input 4 (shift_offsets) needs a 2-D ShiftConv (kernel_shape of 2 values, X [N, C, H, W])"};
      }
      std::string err;
      if (!SelectIsa(&isa_, &err)) throw ConvError{err};
      // Initializer weights are kept (and decoded at the first run, when C is known).
      const size_t n_inputs = ki.GetInputCount();
      int c1 = 0, c2 = 0, c3 = 1;
      Ort::ConstValue codes = ki.GetTensorConstantInput(1, &c1);
      Ort::ConstValue exponent = ki.GetTensorConstantInput(2, &c2);
      Ort::ConstValue bias{nullptr};
      if (n_inputs > 3) {
        try {
          bias = ki.GetTensorConstantInput(3, &c3);
        } catch (const Ort::Exception&) {
          c3 = 0;
          bias = Ort::ConstValue{nullptr};
        }
        if (static_cast<const OrtValue*>(bias) == nullptr && ki.GetInputName(3).empty()) c3 = 1;
      }
      if (c1 && c2 && c3) {
        constant_ = true;
        Keep(codes, exponent, bias);
      }
    } catch (const ConvError& e) {
      Fail(e.message);
    } catch (const Ort::Exception& e) {
      Fail(e.what());
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return ComputeStatus<ConvError>(Message(""), [&] { Compute(context); });
  }

  std::string Message(const std::string& what) const { return "ShiftConv node '" + node_ + "': " + what; }
  [[noreturn]] void Fail(const std::string& what) const { throw Ort::Exception(Message(what), ORT_INVALID_ARGUMENT); }

 private:
  // Copies of the initializer weights, type-checked (lengths are checked per run).
  void Keep(const Ort::ConstValue& codes, const Ort::ConstValue& exponent, const Ort::ConstValue& bias) {
    auto take = [&](const Ort::ConstValue& v, const char* name, ONNXTensorElementDataType type) {
      if (!v.IsTensor()) throw ConvError{std::string(name) + " is not a tensor"};
      const auto info = v.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != type)
        throw ConvError{std::string(name) + " must be " + TypeName(type) + ", got " + TypeName(info.GetElementType())};
      if (info.GetShape().size() != 1) throw ConvError{std::string(name) + " must be 1-D, got " + ConvShapeString(info.GetShape())};
      return static_cast<int64_t>(info.GetElementCount());
    };
    const int64_t nc = take(codes, "W_codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    const int64_t ne = take(exponent, "W_exponent", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8);
    codes_.assign(codes.GetTensorData<uint8_t>(), codes.GetTensorData<uint8_t>() + nc);
    exponent_.assign(exponent.GetTensorData<int8_t>(), exponent.GetTensorData<int8_t>() + ne);
    has_bias_ = static_cast<const OrtValue*>(bias) != nullptr;
    if (has_bias_) {
      const int64_t nb = take(bias, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      bias_.assign(bias.GetTensorData<float>(), bias.GetTensorData<float>() + nb);
    }
  }

  // The packed weights for C/G = cg: the cached ones (initializers), else from this run's inputs.
  std::shared_ptr<const PackedShiftConv> Weights(Ort::KernelContext& ctx, const ConvGeom& g) {
    int64_t bits = 0;
    if (!ProductOk({fmt_.terms, g.m, g.cg, g.k, fmt_.weight_bits}, &bits) || bits > INT64_MAX - 7)
      throw ConvError{"W_codes length terms * M * (C/group) * K * weight_bits does not fit int64"};
    const int64_t n_bytes = (bits + 7) / 8;
    auto length_error = [&](int64_t got) {
      return ConvError{"W_codes must have shape [" + std::to_string(n_bytes) + "] (ceil(terms * M * (C/group) * K * weight_bits / 8) = ceil(" +
                       std::to_string(fmt_.terms) + " * " + std::to_string(g.m) + " * " + std::to_string(g.cg) + " * " +
                       std::to_string(g.k) + " * " + std::to_string(fmt_.weight_bits) + " / 8)), got [" + std::to_string(got) + "]"};
    };
    if (constant_) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cache_ && cache_->cg == g.cg) return cache_;
      if (static_cast<int64_t>(codes_.size()) != n_bytes) throw length_error(static_cast<int64_t>(codes_.size()));
      if (static_cast<int64_t>(exponent_.size()) != g.m)
        throw ConvError{"W_exponent must have shape [" + std::to_string(g.m) + "], got [" + std::to_string(exponent_.size()) + "]"};
      if (has_bias_ && static_cast<int64_t>(bias_.size()) != g.m)
        throw ConvError{"B must have shape [" + std::to_string(g.m) + "], got [" + std::to_string(bias_.size()) + "]"};
      auto p = std::make_shared<PackedShiftConv>();
      Pack(fmt_, g.m, g.cg, g.k, codes_.data(), n_bytes, exponent_.data(), has_bias_ ? bias_.data() : nullptr, p.get());
      cache_ = p;
      return cache_;
    }
    const Ort::ConstValue codes = ctx.GetInput(1), exponent = ctx.GetInput(2);
    const Ort::ConstValue bias = ctx.GetInputCount() > 3 ? ctx.GetInput(3) : Ort::ConstValue{nullptr};
    if (codes.IsTensor() && codes.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      const auto shape = codes.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() != 1 || shape[0] != n_bytes) throw length_error(shape.empty() ? -1 : shape[0]);
    }
    CheckVector(codes, "W_codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, n_bytes);
    CheckVector(exponent, "W_exponent", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, g.m);
    const bool has_bias = static_cast<const OrtValue*>(bias) != nullptr;
    if (has_bias) CheckVector(bias, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, g.m);
    auto p = std::make_shared<PackedShiftConv>();
    Pack(fmt_, g.m, g.cg, g.k, codes.GetTensorData<uint8_t>(), n_bytes, exponent.GetTensorData<int8_t>(),
         has_bias ? bias.GetTensorData<float>() : nullptr, p.get());
    return p;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw ConvError{std::string("X must be float32, got ") + TypeName(x_info.GetElementType())};
    // Read through a shift: the conv's input is SpatialShift(X, ...), [N, C, ceil(H/sh), ceil(W/sw)].
    ConvInputShift shift;
    std::vector<int64_t> conv_in = x_info.GetShape();
    if (has_shift_) {
      shift.g = SpatialShiftMakeGeom(shift_attrs_, conv_in, ctx, 4, "shift_", &shift.offsets);
      shift.plane = SpatialShiftPlaneKernel(isa_);
      conv_in = {shift.g.n, shift.g.c, shift.g.oh, shift.g.ow};
    }
    const ConvInputShift* through = has_shift_ ? &shift : nullptr;
    const ConvGeom g = ConvGeom::Make(conv_, conv_in);
    int64_t reduce = 0;
    if (!ProductOk({g.cg, g.k, fmt_.terms}, &reduce) || reduce > kConvMaxReduce)
      throw ConvError{"(C/group) * K * terms = " + ProductString({g.cg, g.k, fmt_.terms}) + " is above 2^22"};
    const std::shared_ptr<const PackedShiftConv> p = Weights(ctx, g);
    Ort::UnownedValue y = ctx.GetOutput(0, g.y_shape);
    if (g.n == 0 || g.oh * g.ow == 0) return;
    const float* xd = x.GetTensorData<float>();
    float* yd = y.GetTensorMutableData<float>();
    const Parallel par(context);
    if (isa_ == Isa::kScalar || !ConvPlanesPay(g)) {
      if (through == nullptr) {
        ShiftConvScalar(*p, g, conv_.act, xd, yd, par);
        return;
      }
      // The fallback materialises each image's shifted input (SpatialShiftRun, the op's own run).
      std::vector<float> shifted(static_cast<size_t>(g.c * g.h * g.w));
      ConvGeom g1 = g;
      g1.n = 1;
      for (int64_t n = 0; n < g.n; ++n) {
        shift.Image(xd, n, shifted.data(), par, isa_);
        ShiftConvScalar(*p, g1, conv_.act, shifted.data(), yd + n * g.m * g.oh * g.ow, par);
      }
      return;
    }
    // The entry lists depend on the input's spatial size: initializer weights keep the last ones.
    std::shared_ptr<const Prepared> prep;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (constant_ && prepared_ && prepared_->p == p && prepared_->h == g.h && prepared_->w == g.w) prep = prepared_;
    }
    if (!prep) {
      auto fresh = std::make_shared<Prepared>();
      fresh->p = p;
      fresh->h = g.h;
      fresh->w = g.w;
      fresh->planes = ConvPlanes::Make(g, 1, 128);
      if (isa_ == Isa::kAvx512 && ShiftConvLutPays(g, p->terms)) {
        fresh->lut = std::make_unique<PackedShiftLinear>();
        PackShiftConvLut(*p, fresh->lut.get());
        fresh->tap.resize(static_cast<size_t>(g.k));
        for (int64_t u = 0; u < g.kh; ++u)
          for (int64_t v = 0; v < g.kw; ++v) fresh->tap[u * g.kw + v] = fresh->planes.TapOffset(g, u, v);
      } else {
        BuildEntries(*p, g, fresh->planes, &fresh->entries, &fresh->begin, &fresh->split);
      }
      prep = fresh;
      if (constant_) {
        std::lock_guard<std::mutex> lock(mutex_);
        prepared_ = prep;
      }
    }
    ScratchPool::Lease scratch(scratch_);
    if (prep->lut) {
      const ShiftConvLutRun run{prep->lut.get(), g, prep->planes, conv_.act, prep->tap.data(), through};
      ShiftConvLutAvx512(run, xd, yd, par, scratch.buffer());
      return;
    }
    const ShiftConvRun run{p.get(), g, prep->planes, conv_.act, prep->entries.data(), prep->begin.data(),
                           prep->split.data(), through};
    if (isa_ == Isa::kAvx512) {
      ShiftConvAvx512(run, xd, yd, par, scratch.buffer());
    } else {
      ShiftConvAvx2(run, xd, yd, par, scratch.buffer());
    }
  }

  std::string node_;
  ConvAttrs conv_;
  Format fmt_;
  Isa isa_ = Isa::kScalar;
  bool constant_ = false, has_bias_ = false, has_shift_ = false;
  SpatialShiftAttrs shift_attrs_;
  std::vector<uint8_t> codes_;
  std::vector<int8_t> exponent_;
  std::vector<float> bias_;
  std::mutex mutex_;
  std::shared_ptr<const PackedShiftConv> cache_;  // initializer weights decoded for cache_->cg
  struct Prepared {                                // the SIMD entry lists for one input size
    std::shared_ptr<const PackedShiftConv> p;
    int64_t h = 0, w = 0;
    ConvPlanes planes;
    std::vector<ShiftConvEntry> entries;
    std::vector<int64_t> begin, split;
    std::unique_ptr<PackedShiftLinear> lut;  // the lookup-table path (ShiftConvLutPays), else null
    std::vector<int64_t> tap;                // its tap offsets
  };
  std::shared_ptr<const Prepared> prepared_;
  ScratchPool scratch_;
};

struct ShiftConvOp : Ort::CustomOpBase<ShiftConvOp, ShiftConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return CreateKernelStatus<ShiftConvKernel>(api, info, kernel, "ShiftConv");
  }
  const char* GetName() const { return "ShiftConv"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  // X, W_codes, W_exponent, B (optional), shift_offsets, shift_scale, shift_bias (optional)
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// Portable: the spec's formula per output element over the quantised image.
void ShiftConvScalar(const PackedShiftConv& p, const ConvGeom& g, const ConvActivation& act,
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
      const uint8_t* codes = p.codes.data() + o * p.terms * row;
      float* yo = y + n * out_image + o * g.oh * g.ow;
      for (int64_t oh = 0; oh < g.oh; ++oh) {
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          uint32_t acc = 0;  // int32 with wrap-around
          for (int t = 0; t < p.terms; ++t) {
            for (int64_t c = 0; c < p.cg; ++c) {
              const int32_t* plane = xq.data() + (c0 + c) * g.h * g.w;
              for (int64_t u = 0; u < g.kh; ++u) {
                const int64_t ih = oh * g.sh + u * g.dh - g.pt;
                if (ih < 0 || ih >= g.h) continue;
                for (int64_t v = 0; v < g.kw; ++v) {
                  const int64_t iw = ow * g.sw + v * g.dw - g.pl;
                  const uint8_t code = codes[t * row + c * p.k + u * g.kw + v];
                  if (iw < 0 || iw >= g.w || code == kZeroCode) continue;
                  const uint32_t term = static_cast<uint32_t>(plane[ih * g.w + iw] >> (code & 15));
                  acc += (code >> 4) ? 0u - term : term;
                }
              }
            }
          }
          const float f = static_cast<float>(static_cast<int32_t>(acc));
          yo[oh * g.ow + ow] = act.Apply(f * p.scale[o] + p.bias[o]);
        }
      }
    });
  }
}

const OrtCustomOp* ShiftConvCustomOp() {
  static const ShiftConvOp op;
  return &op;
}

}  // namespace mfconvert
