// The AddLinearAttention custom op: attribute and shape checks (errors name the node), the
// binary codes of Q and K (float64, docs/ops.md#binarisers), then the ISA's kernel.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "add_attention.h"
#include "attrs.h"
#include "checked.h"
#include "cpu_isa.h"
#include "custom_ops.h"
#include "ort_api.h"

namespace mfconvert {
namespace {

enum Input { kQ, kK, kV, kMask, kConv, kQThreshold, kKThreshold, kAnchors, kCenter, kProjection, kSigma, kInputs };
constexpr float kMaskedBelow = -1000.0f;

struct Error {
  std::string message;
};

std::string Shape(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

struct Tensor {
  const float* data = nullptr;
  std::vector<int64_t> shape;
  bool present = false;
};

// Codes of tokens [t0, t1) of (b, h): x̂ = x / ‖x‖ in float64, then per binariser.
struct Binarizer {
  bool ksh = false;
  int64_t heads = 0, depth = 0, bits = 0, words = 0, anchors = 0;
  const float* q_threshold = nullptr;   // sign
  const float* k_threshold = nullptr;
  const float* anchor = nullptr;        // ksh [H, m, D]
  const float* center = nullptr;        // [H, m]
  const float* projection = nullptr;    // [H, bits, m]
  const float* sigma = nullptr;         // [H]
  void (*positive_bits)(const float*, int64_t, uint64_t*) = PositiveBitsScalar;  // per ISA

  void Codes(const float* x, int64_t stride, int64_t h, const float* threshold, uint64_t* out,
             std::vector<double>& xn, std::vector<double>& kappa) const {
    if (!ksh && threshold == nullptr) {
      // τ = 0: x̂ > 0 ⇔ x > 0 (‖x‖ > 0 whenever some x > 0), no norm needed.
      positive_bits(x, depth, out);
      return;
    }
    std::fill(out, out + words, uint64_t{0});
    double sq = 0.0;
    for (int64_t d = 0; d < depth; ++d) sq += static_cast<double>(x[d]) * static_cast<double>(x[d]);
    const double norm = std::sqrt(sq);
    for (int64_t d = 0; d < depth; ++d) xn[d] = norm > 0 ? static_cast<double>(x[d]) / norm : 0.0;
    if (!ksh) {
      const float* tau = threshold + h * depth;
      for (int64_t d = 0; d < depth; ++d) out[d / 64] |= static_cast<uint64_t>(xn[d] > static_cast<double>(tau[d])) << (d % 64);
      return;
    }
    const double two_sigma = 2.0 * static_cast<double>(sigma[h]);
    for (int64_t i = 0; i < anchors; ++i) {
      const float* a = anchor + (h * anchors + i) * depth;
      double d2 = 0.0;
      for (int64_t d = 0; d < depth; ++d) {
        const double diff = xn[d] - static_cast<double>(a[d]);
        d2 += diff * diff;
      }
      kappa[i] = std::exp(-d2 / two_sigma) - static_cast<double>(center[h * anchors + i]);
    }
    for (int64_t r = 0; r < bits; ++r) {
      const float* row = projection + (h * bits + r) * anchors;
      double y = 0.0;
      for (int64_t i = 0; i < anchors; ++i) y += kappa[i] * static_cast<double>(row[i]);
      if (y > 0) out[r / 64] |= uint64_t{1} << (r % 64);
    }
  }
};

struct AddAttentionKernel {
  std::string name;
  int64_t heads = 0, grid_h = 0, grid_w = 0, prefix = 0;
  bool ksh = false;
  Isa isa = Isa::kScalar;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const Error& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("AddLinearAttention node '" + name + "': " + e.message).c_str());
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), ("AddLinearAttention node '" + name + "': " + e.what()).c_str());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, ("AddLinearAttention node '" + name + "': " + e.what()).c_str());
    }
    return nullptr;
  }

  static Tensor Get(Ort::KernelContext& ctx, size_t i, const char* what) {
    Tensor t;
    if (i >= ctx.GetInputCount()) return t;
    Ort::ConstValue v = ctx.GetInput(i);
    if (v == nullptr) return t;
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Error{std::string(what) + " must be float32"};
    t.shape = info.GetShape();
    t.data = v.GetTensorData<float>();
    t.present = true;
    return t;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Tensor q = Get(ctx, kQ, "Q"), k = Get(ctx, kK, "K"), v = Get(ctx, kV, "V"), mask = Get(ctx, kMask, "mask");
    const Tensor conv = Get(ctx, kConv, "conv_weight");
    if (!q.present || !v.present) throw Error{"Q and V are required"};
    if (q.shape.size() != 3) throw Error{"Q must be [B, T, C], got " + Shape(q.shape)};
    if (v.shape != q.shape) throw Error{"V has shape " + Shape(v.shape) + ", Q has " + Shape(q.shape)};
    if (k.present && k.shape != q.shape) throw Error{"K has shape " + Shape(k.shape) + ", Q has " + Shape(q.shape)};
    const int64_t b = q.shape[0], t = q.shape[1], c = q.shape[2];
    // Every size below is checked once here, so the products the kernels index with cannot wrap.
    CheckedProduct<Error>("B * T * C", {b, t, c});
    if (c % heads != 0) throw Error{"C = " + std::to_string(c) + " is not divisible by num_heads = " + std::to_string(heads)};
    const int64_t d = c / heads;

    Binarizer bz;
    bz.ksh = ksh;
    bz.heads = heads;
    bz.depth = d;
    bz.positive_bits = isa == Isa::kAvx512 ? PositiveBitsAvx512 : isa == Isa::kAvx2 ? PositiveBitsAvx2 : PositiveBitsScalar;
    if (!ksh) {
      bz.bits = d;
      const Tensor tq = Get(ctx, kQThreshold, "q_threshold"), tk = Get(ctx, kKThreshold, "k_threshold");
      for (const Tensor* th : {&tq, &tk}) {
        if (th->present && th->shape != std::vector<int64_t>{heads, d})
          throw Error{"sign thresholds must be [H, D] = " + Shape({heads, d}) + ", got " + Shape(th->shape)};
      }
      bz.q_threshold = tq.data;
      bz.k_threshold = tk.data;
    } else {
      if (k.present) throw Error{"binarizer 'ksh' shares qk: K must be absent"};
      const Tensor an = Get(ctx, kAnchors, "hash_anchors"), ce = Get(ctx, kCenter, "hash_center");
      const Tensor pr = Get(ctx, kProjection, "hash_projection"), si = Get(ctx, kSigma, "hash_sigma");
      if (!an.present || !ce.present || !pr.present || !si.present)
        throw Error{"binarizer 'ksh' needs hash_anchors, hash_center, hash_projection and hash_sigma"};
      if (an.shape.size() != 3 || an.shape[0] != heads || an.shape[2] != d)
        throw Error{"hash_anchors must be [H, m, D], got " + Shape(an.shape)};
      const int64_t m = an.shape[1];
      if (ce.shape != std::vector<int64_t>{heads, m}) throw Error{"hash_center must be [H, m] = " + Shape({heads, m}) + ", got " + Shape(ce.shape)};
      if (pr.shape.size() != 3 || pr.shape[0] != heads || pr.shape[2] != m || pr.shape[1] < 1 || pr.shape[1] > 64)
        throw Error{"hash_projection must be [H, nbits <= 64, m], got " + Shape(pr.shape)};
      if (si.shape != std::vector<int64_t>{heads}) throw Error{"hash_sigma must be [H], got " + Shape(si.shape)};
      for (int64_t h = 0; h < heads; ++h)
        if (!(si.data[h] > 0)) throw Error{"hash_sigma must be > 0"};
      bz.bits = pr.shape[1];
      bz.anchors = m;
      bz.anchor = an.data;
      bz.center = ce.data;
      bz.projection = pr.data;
      bz.sigma = si.data;
    }
    bz.words = (bz.bits + 63) / 64;
    const int64_t code_words = CheckedProduct<Error>("code words B * H * T * words", {b, heads, t, bz.words});
    const int64_t s_floats = CheckedProduct<Error>("S floats B * H * bits * D", {b, heads, bz.bits, d});
    CheckedProduct<Error>("partial S floats B * H * ceil(T / 256) * bits * D", {b, heads, t / 256 + 1, bz.bits, d});

    AddAttentionProblem p;
    p.batch = b; p.tokens = t; p.heads = heads; p.depth = d; p.bits = bz.bits; p.words = bz.words;
    p.v = v.data;
    std::vector<uint8_t> keep;
    if (mask.present) {
      // [B|1, T], [B|1, 1, 1, T]: one key mask per batch item. [B|1, 1, T, T], [B|1, T, T]: query x key
      // (transformers >= 5 expands the padding mask over the queries); linear attention needs a
      // key mask, so every query row must mask the same keys as row 0 (checked: O(B*T^2) reads).
      const auto& s = mask.shape;
      const size_t r = s.size();
      const bool batch_ok = r >= 2 && (s[0] == 1 || s[0] == b) && s.back() == t;
      int64_t rows = -1;  // query rows per batch item (0 when T = 0); -1: not a mask shape
      if (batch_ok && r == 2) rows = 1;
      if (batch_ok && r == 3 && (s[1] == 1 || s[1] == t)) rows = s[1];
      if (batch_ok && r == 4 && s[1] == 1 && (s[2] == 1 || s[2] == t)) rows = s[2];
      if (rows < 0)
        throw Error{"mask must be [B|1, T], [B|1, 1, 1|T, T] or [B|1, 1|T, T] with B = " + std::to_string(b) +
                    ", T = " + std::to_string(t) + ", got " + Shape(s)};
      keep.resize(static_cast<size_t>(CheckedProduct<Error>("B * T", {b, t})));
      CheckedProduct<Error>("mask size", {s[0], rows, t});
      for (int64_t i = 0; i < b; ++i) {
        const int64_t mb = s[0] == 1 ? 0 : i;
        const float* row0 = mask.data + mb * rows * t;
        for (int64_t j = 0; j < t; ++j) keep[i * t + j] = row0[j] >= kMaskedBelow;  // NaN masks the key
        if (mb != i) continue;   // a shared mask is checked once, at batch item 0
        for (int64_t q_row = 1; q_row < rows; ++q_row) {
          const float* row = row0 + q_row * t;
          for (int64_t j = 0; j < t; ++j) {
            if ((row[j] >= kMaskedBelow) != (keep[i * t + j] != 0))
              throw Error{"mask is not per key: query row " + std::to_string(q_row) + " of batch item " +
                          std::to_string(i) + " masks other keys than row 0 (key " + std::to_string(j) +
                          "); a causal or other per-query mask is not linear attention"};
          }
        }
      }
      p.keep = keep.data();
    }
    if (conv.present) {
      const auto& s = conv.shape;
      if (s.size() == 2 && s[0] == heads && s[1] % 2 == 1) {
        p.conv_rank = 2;
        p.conv_k = s[1];
      } else if (s.size() == 3 && s[0] == heads && s[1] % 2 == 1 && s[2] % 2 == 1) {
        int64_t grid_tokens = 0, needed = 0;   // overflow-checked: a wrapped product must not match T
        const bool fits = MulOk(grid_h, grid_w, &grid_tokens) && AddOk(prefix, grid_tokens, &needed);
        if (!fits)
          throw Error{"prefix_tokens + grid_h * grid_w = " + std::to_string(prefix) + " + " + std::to_string(grid_h) +
                      " * " + std::to_string(grid_w) + " does not fit int64"};
        if (grid_h <= 0 || grid_w <= 0 || t != needed)
          throw Error{"a [H, kh, kw] conv_weight needs T = prefix_tokens + grid_h * grid_w; T = " + std::to_string(t) +
                      ", prefix_tokens = " + std::to_string(prefix) + ", grid = " + std::to_string(grid_h) + "x" +
                      std::to_string(grid_w)};
        p.conv_rank = 3;
        p.conv_kh = s[1];
        p.conv_kw = s[2];
        p.grid_h = grid_h; p.grid_w = grid_w; p.prefix = prefix;
      } else {
        throw Error{"conv_weight must be [H, odd k] or [H, odd kh, odd kw] with H = " + std::to_string(heads) +
                    ", got " + Shape(s)};
      }
      p.conv = conv.data;
    }

    auto out = ctx.GetOutput(0, q.shape);
    p.y = out.GetTensorMutableData<float>();
    if (b == 0 || t == 0 || c == 0) return;

    std::vector<uint64_t> qc(static_cast<size_t>(code_words));
    std::vector<uint64_t> kc(ksh ? 0 : qc.size());   // sign: K's own codes (K absent: from Q)
    const float* k_data = k.present ? k.data : q.data;
    std::vector<float> s_buf(static_cast<size_t>(s_floats));
    const Parallel par(context);
    constexpr int64_t kTokensPerTask = 128;
    const int64_t chunks = (t + kTokensPerTask - 1) / kTokensPerTask;
    par.For(static_cast<size_t>(b * heads * chunks), [&](size_t task) {
      const int64_t i = static_cast<int64_t>(task), g = i / chunks, chunk = i % chunks;
      const int64_t bi = g / heads, h = g % heads;
      std::vector<double> xn(static_cast<size_t>(d)), kappa(static_cast<size_t>(std::max<int64_t>(1, bz.anchors)));
      for (int64_t j = chunk * kTokensPerTask; j < std::min(t, (chunk + 1) * kTokensPerTask); ++j) {
        const int64_t src = (bi * t + j) * c + h * d, dst = (g * t + j) * bz.words;
        bz.Codes(q.data + src, 1, h, bz.q_threshold, qc.data() + dst, xn, kappa);
        if (!kc.empty()) bz.Codes(k_data + src, 1, h, bz.k_threshold, kc.data() + dst, xn, kappa);
      }
    });
    p.q_codes = qc.data();
    // ksh hashes the shared qk once: the key codes are the query codes.
    p.k_codes = kc.empty() ? qc.data() : kc.data();
    p.s = s_buf.data();
    switch (isa) {
      case Isa::kAvx512: AddAttentionAvx512(p, par); break;
      case Isa::kAvx2: AddAttentionAvx2(p, par); break;
      default: AddAttentionScalar(p, par); break;
    }
  }
};

struct AddAttentionOp : Ort::CustomOpBase<AddAttentionOp, AddAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    std::string node = "?";
    try {
      Ort::ConstKernelInfo ki(info);
      node = ki.GetNodeName();
      auto k = std::make_unique<AddAttentionKernel>();
      k->name = node;
      // Absent attributes take their defaults (num_heads is required); another type is an error.
      auto int_attr = [&](const char* a, bool required) -> int64_t {
        int64_t value = 0;
        bool present = false;
        const std::string err = ReadIntAttr(info, a, &value, &present);
        if (!err.empty()) throw Error{err};
        if (!present && required) throw Error{std::string("missing required attribute ") + a};
        return present ? value : 0;
      };
      k->heads = int_attr("num_heads", true);
      std::string binarizer = "sign";
      bool present = false;
      const std::string err = ReadStringAttr(info, "binarizer", &binarizer, &present);
      if (!err.empty()) throw Error{err};
      if (!present) binarizer = "sign";
      k->grid_h = int_attr("grid_h", false);
      k->grid_w = int_attr("grid_w", false);
      k->prefix = int_attr("prefix_tokens", false);
      if (k->heads < 1) throw Error{"num_heads must be >= 1"};
      if (binarizer != "sign" && binarizer != "ksh") throw Error{"binarizer must be 'sign' or 'ksh', got '" + binarizer + "'"};
      if (k->grid_h < 0 || k->grid_w < 0 || k->prefix < 0) throw Error{"grid_h, grid_w and prefix_tokens must be >= 0"};
      k->ksh = binarizer == "ksh";
      std::string isa_err;
      if (!SelectIsa(&k->isa, &isa_err)) throw Error{isa_err};
      *kernel = k.release();
    } catch (const Error& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("AddLinearAttention node '" + node + "': " + e.message).c_str());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("AddLinearAttention node '" + node + "': " + e.what()).c_str());
    }
    return nullptr;
  }
  const char* GetName() const { return "AddLinearAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (i == kQ || i == kV) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* AddLinearAttentionCustomOp() {
  static const AddAttentionOp op;
  return &op;
}

}  // namespace mfconvert
