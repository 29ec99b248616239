// What ShiftConv and AdderConv share (docs/ops.md#shiftconv, #adderconv): the Conv attributes
// (typed reads, ranges), the geometry of one run (overflow-checked), the fused activation, and the
// phase-split plane layout of the quantised input that the SIMD kernels read.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attrs.h"
#include "checked.h"
#include "ort_api.h"
#include "shift_linear_pack.h"

namespace mfconvert {

// Step 1 of the arithmetic: x_q = sat_A(floor(x * 2^F)), NaN -> 0.
inline int32_t ConvQuantize(float x, const ActQuant& q) {
  const float f = std::floor(x * q.scale);
  if (std::isnan(f)) return 0;
  if (f >= q.hi) return q.qhi;
  if (f <= q.lo) return q.qlo;
  return static_cast<int32_t>(f);
}

// An error of a conv op; the kernel prefixes the node ("ShiftConv node 'x': ").
struct ConvError {
  std::string message;
};

inline constexpr int64_t kConvMaxReduce = int64_t{1} << 22;  // (C/G) * K (* T)

inline std::string ConvShapeString(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t k = 0; k < s.size(); ++k) r += (k ? ", " : "") + std::to_string(s[k]);
  return r + "]";
}

// The fused activation as a clamp: "" = [-inf, inf], "Relu" = [0, inf], "Clip" = [lo, hi].
// min(max(y, lo), hi) with NaN kept gives each exactly (docs/ops.md#fused-activation...).
struct ConvActivation {
  float lo = -std::numeric_limits<float>::infinity();
  float hi = std::numeric_limits<float>::infinity();
  bool any = false;  // "" needs no work
  float Apply(float y) const {
    if (!any || y != y) return y;
    return std::min(std::max(y, lo), hi);
  }
};

namespace conv_detail {

inline bool Ok(OrtStatus* status) {
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

// An ints attribute: absent -> *present = false; another type -> ConvError.
inline std::vector<int64_t> ReadInts(const OrtKernelInfo* info, const char* name, bool* present) {
  const OrtApi& api = Ort::GetApi();
  size_t n = 0;
  OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st == nullptr && n == 0) {
    // ORT answers the size query of a scalar or string attribute with 0: ask what it is.
    // (Types no getter reads, such as strings or a graph, stay an empty list: a length error.)
    int64_t i = 0;
    float f = 0;
    size_t len = 0, nf = 0;
    OrtAllocator* alloc = nullptr;
    OrtValue* tensor = nullptr;
    const char* got = nullptr;
    if (Ok(api.KernelInfoGetAttribute_int64(info, name, &i))) {
      got = "an int";
    } else if (Ok(api.KernelInfoGetAttribute_float(info, name, &f))) {
      got = "a float";
    } else if (Ok(api.KernelInfoGetAttribute_string(info, name, nullptr, &len))) {
      got = "a string";
    } else if (Ok(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &nf)) && nf > 0) {
      got = "a list of floats";
    } else if (Ok(api.GetAllocatorWithDefaultOptions(&alloc)) &&
               Ok(api.KernelInfoGetAttribute_tensor(info, name, alloc, &tensor))) {
      api.ReleaseValue(tensor);
      got = "a tensor";
    }
    if (got != nullptr) throw ConvError{std::string("attribute ") + name + " must be a list of ints, got " + got};
    *present = true;
    return {};
  }
  if (st == nullptr) {
    std::vector<int64_t> v(n);
    if (Ok(api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &n))) {
      *present = true;
      v.resize(n);
      return v;
    }
    st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
    if (st == nullptr) throw ConvError{std::string("attribute ") + name + " could not be read"};
  }
  *present = false;
  const std::string got = attrs_detail::Describe(info, name, st);
  if (got.empty()) return {};
  throw ConvError{std::string("attribute ") + name + " must be a list of ints, got " + got};
}

inline float ReadFloat(const OrtKernelInfo* info, const char* name, float def, bool* present) {
  float v = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  *present = st == nullptr;
  if (*present) return v;
  const std::string got = attrs_detail::Describe(info, name, st);
  if (got.empty()) return def;
  throw ConvError{std::string("attribute ") + name + " must be a float, got " + got};
}

}  // namespace conv_detail

// The Conv attributes of both ops. kernel_shape's length fixes the spatial rank d (1 or 2).
struct ConvAttrs {
  int64_t out_channels = 0, group = 1;
  std::vector<int64_t> kernel, strides, pads, dilations;
  ConvActivation act;

  // Reads and checks every attribute (ConvError naming the attribute on failure).
  void Read(const OrtKernelInfo* info) {
    auto int_attr = [&](const char* name, int64_t def, bool required) {
      int64_t v = def;
      bool present = false;
      const std::string err = ReadIntAttr(info, name, &v, &present);
      if (!err.empty()) throw ConvError{err};
      if (!present && required) throw ConvError{std::string("missing required attribute ") + name};
      return present ? v : def;
    };
    out_channels = int_attr("out_channels", 0, true);
    if (out_channels < 1 || out_channels > kConvMaxReduce)
      throw ConvError{"attribute out_channels=" + std::to_string(out_channels) + " is outside [1, " +
                      std::to_string(kConvMaxReduce) + "]"};
    group = int_attr("group", 1, false);
    if (group < 1) throw ConvError{"attribute group=" + std::to_string(group) + " must be >= 1"};
    if (out_channels % group != 0)
      throw ConvError{"out_channels=" + std::to_string(out_channels) + " is not divisible by group=" +
                      std::to_string(group)};
    bool present = false;
    kernel = conv_detail::ReadInts(info, "kernel_shape", &present);
    if (!present) throw ConvError{"missing required attribute kernel_shape"};
    const size_t d = kernel.size();
    if (d < 1 || d > 2)
      throw ConvError{"attribute kernel_shape " + ConvShapeString(kernel) + " must have 1 or 2 values (a 1-D or 2-D conv)"};
    auto list = [&](const char* name, size_t n, int64_t def, int64_t lo) {
      bool here = false;
      std::vector<int64_t> v = conv_detail::ReadInts(info, name, &here);
      if (!here) return std::vector<int64_t>(n, def);
      if (v.size() != n)
        throw ConvError{std::string("attribute ") + name + " " + ConvShapeString(v) + " must have " +
                        std::to_string(n) + " values (kernel_shape has " + std::to_string(d) + ")"};
      for (int64_t x : v)
        if (x < lo || x > (int64_t{1} << 31))
          throw ConvError{std::string("attribute ") + name + " " + ConvShapeString(v) + " has a value outside [" +
                          std::to_string(lo) + ", 2^31]"};
      return v;
    };
    for (int64_t k : kernel)
      if (k < 1 || k > kConvMaxReduce)
        throw ConvError{"attribute kernel_shape " + ConvShapeString(kernel) + " has a value outside [1, 2^22]"};
    strides = list("strides", d, 1, 1);
    pads = list("pads", 2 * d, 0, 0);
    dilations = list("dilations", d, 1, 1);

    std::string name;
    const std::string err = ReadStringAttr(info, "activation", &name, &present);
    if (!err.empty()) throw ConvError{err};
    if (!present) name.clear();
    bool has_min = false, has_max = false;
    const float lo = conv_detail::ReadFloat(info, "clip_min", -std::numeric_limits<float>::infinity(), &has_min);
    const float hi = conv_detail::ReadFloat(info, "clip_max", std::numeric_limits<float>::infinity(), &has_max);
    if (name.empty()) {
      act = ConvActivation{};
    } else if (name == "Relu") {
      act = ConvActivation{0.0f, std::numeric_limits<float>::infinity(), true};
    } else if (name == "Clip") {
      if (std::isnan(lo) || std::isnan(hi) || lo > hi)
        throw ConvError{"attributes clip_min=" + std::to_string(lo) + ", clip_max=" + std::to_string(hi) +
                        " must be numbers with clip_min <= clip_max"};
      act = ConvActivation{lo, hi, true};
    } else {
      throw ConvError{"attribute activation='" + name + "' is not one of '', 'Relu', 'Clip'"};
    }
    if ((has_min || has_max) && name != "Clip")
      throw ConvError{"attributes clip_min/clip_max are only allowed with activation='Clip'"};
  }
};

// One run's sizes, a 1-D conv as 2-D with H = 1. Every product used for sizes and offsets is
// checked here.
struct ConvGeom {
  bool one_d = false;
  int64_t n = 0, c = 0, h = 0, w = 0, m = 0, g = 1, cg = 0, mg = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1, pt = 0, pl = 0, pb = 0, pr = 0;
  int64_t oh = 0, ow = 0, k = 0;  // k = kh * kw
  std::vector<int64_t> y_shape;

  static ConvGeom Make(const ConvAttrs& a, const std::vector<int64_t>& x) {
    const size_t d = a.kernel.size();
    if (x.size() != d + 2)
      throw ConvError{"X " + ConvShapeString(x) + " must have rank " + std::to_string(d + 2) + " ([N, C" +
                      (d == 1 ? ", L]" : ", H, W]") + ") for kernel_shape " + ConvShapeString(a.kernel)};
    for (int64_t s : x)
      if (s < 0) throw ConvError{"X has a negative dimension " + ConvShapeString(x)};
    ConvGeom r;
    r.one_d = d == 1;
    r.n = x[0];
    r.c = x[1];
    r.m = a.out_channels;
    r.g = a.group;
    if (r.c % r.g != 0 || r.c == 0)
      throw ConvError{"X has C=" + std::to_string(r.c) + " channels, not a positive multiple of group=" + std::to_string(r.g)};
    r.cg = r.c / r.g;
    r.mg = r.m / r.g;
    if (r.one_d) {
      r.w = x[2];
      r.kw = a.kernel[0]; r.sw = a.strides[0]; r.dw = a.dilations[0]; r.pl = a.pads[0]; r.pr = a.pads[1];
    } else {
      r.h = x[2]; r.w = x[3];
      r.kh = a.kernel[0]; r.kw = a.kernel[1]; r.sh = a.strides[0]; r.sw = a.strides[1];
      r.dh = a.dilations[0]; r.dw = a.dilations[1];
      r.pt = a.pads[0]; r.pl = a.pads[1]; r.pb = a.pads[2]; r.pr = a.pads[3];
    }
    if (r.one_d) r.h = 1;
    r.oh = Out(r.h, r.pt, r.pb, r.kh, r.dh, r.sh, 0);
    r.ow = Out(r.w, r.pl, r.pr, r.kw, r.dw, r.sw, r.one_d ? 0 : 1);
    r.k = CheckedProduct<ConvError>("K = prod(kernel_shape)", {r.kh, r.kw});
    const int64_t reduce = CheckedProduct<ConvError>("(C/group) * K", {r.cg, r.k});
    if (reduce > kConvMaxReduce)
      throw ConvError{"(C/group) * K = " + std::to_string(r.cg) + " * " + std::to_string(r.k) + " is above 2^22"};
    CheckedProduct<ConvError>("Y size N * M * OH * OW", {r.n, r.m, r.oh, r.ow});
    CheckedProduct<ConvError>("X size N * C * H * W", {r.n, r.c, r.h, r.w});
    r.y_shape = r.one_d ? std::vector<int64_t>{r.n, r.m, r.ow} : std::vector<int64_t>{r.n, r.m, r.oh, r.ow};
    return r;
  }

 private:
  // floor((in + b + e - d (k - 1) - 1) / s) + 1, >= 1, overflow-checked.
  static int64_t Out(int64_t in, int64_t b, int64_t e, int64_t k, int64_t d, int64_t s, int axis) {
    int64_t span = 0, padded = 0;
    if (!MulOk(d, k - 1, &span) || !AddOk(in, b, &padded) || !AddOk(padded, e, &padded))
      throw ConvError{"spatial axis " + std::to_string(axis) + ": size, pads or dilation * (kernel - 1) do not fit int64"};
    const int64_t room = padded - span - 1;
    if (room < 0)
      throw ConvError{"spatial axis " + std::to_string(axis) + ": input " + std::to_string(in) + " + pads " +
                      std::to_string(b) + " + " + std::to_string(e) + " is smaller than the dilated kernel " +
                      std::to_string(span + 1) + " (output size below 1)"};
    return room / s + 1;
  }
};

// The quantised input of one image as the SIMD kernels read it: per channel, the zero-padded
// image split into sh * sw phase planes [Hq][Wq] (plane (ph, pw) row r, column q holds padded
// position (r sh + ph, q sw + pw), 0 past the padded image). Output (oh, ow) at tap (u, v) reads
// plane ((u dh) mod sh, (v dw) mod sw) at row oh + (u dh) div sh, column ow + (v dw) div sw: for
// the flat output index f = oh * Wq + ow that is plane + f + TapOffset, contiguous in f across
// rows. The kernels compute every f in [0, OH * Wq) and keep the columns ow < OW.
struct ConvPlanes {
  int64_t hp = 0, wp = 0, hq = 0, wq = 0, plane = 0, channel = 0;  // channel = sh * sw * plane
  int64_t flat = 0;    // OH * Wq
  int64_t count = 0;   // int32 of one copy (C channels)
  int64_t slack = 0;   // int32 after the last copy: junk reads of the last vectors stay inside

  static ConvPlanes Make(const ConvGeom& g, int copies, int64_t vector_span) {
    ConvPlanes p;
    if (!AddOk(g.h, g.pt + g.pb, &p.hp) || !AddOk(g.w, g.pl + g.pr, &p.wp))
      throw ConvError{"padded input size does not fit int64"};
    p.hq = (p.hp + g.sh - 1) / g.sh;
    p.wq = (p.wp + g.sw - 1) / g.sw;
    p.plane = CheckedProduct<ConvError>("plane size", {p.hq, p.wq});
    p.channel = CheckedProduct<ConvError>("channel planes", {g.sh, g.sw, p.plane});
    p.count = CheckedProduct<ConvError>("quantised input C * planes", {g.c, p.channel});
    p.flat = CheckedProduct<ConvError>("OH * Wq", {g.oh, p.wq});
    p.slack = p.wq + 2 * vector_span;
    int64_t total = 0;
    if (!MulOk(p.count, copies, &total) || !AddOk(total, p.slack, &total) || total > (int64_t{1} << 40))
      throw ConvError{"quantised input of one image (" + std::to_string(p.count) + " int32 per copy) is too large"};
    return p;
  }

  int64_t Total(int copies) const { return count * copies + slack; }

  int64_t TapOffset(const ConvGeom& g, int64_t u, int64_t v) const {
    const int64_t ru = u * g.dh, rv = v * g.dw;
    return ((ru % g.sh) * g.sw + rv % g.sw) * plane + (ru / g.sh) * wq + rv / g.sw;
  }
};

}  // namespace mfconvert
