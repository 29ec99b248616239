// The AddLinearAttention kernel body, instantiated once per ISA: each add_attention_<isa>.cc
// includes the standard headers, sets its target, defines `struct Vec` (Width lanes with Load,
// Store, Add, masked tail Load/Store) and then includes this file inside an anonymous namespace.
// Only S and Q_b·S are hot (O(T·bits·D) additions); the epilogue (scale, norm, conv) is O(T·D).

constexpr int64_t kKeyChunk = 256;    // keys per task of the S phase (fixed: sums do not depend on threads)
constexpr int64_t kQueryChunk = 32;   // queries per task of the output phase
constexpr int kLanes = 16;
constexpr float kInvPi = static_cast<float>(0.31830988618379067154);

// acc[0:n] += row[0:n]
inline void AddRow(float* acc, const float* row, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::kWidth <= n; i += Vec::kWidth) Vec::Store(acc + i, Vec::Add(Vec::Load(acc + i), Vec::Load(row + i)));
  if (i < n) Vec::AddTail(acc + i, row + i, n - i);
}

// acc[0:n] = Σ over the set bits r of code of s[r][0:n] (rows `stride` floats apart), four
// vectors of the accumulator held in registers per pass over the bits, as two partial sums (the
// set bits taken alternately, then added) so the two dependency chains of adds overlap. With
// `add_to` the sum is added to acc's values instead (acc + (r + e) per element).
using VecT = decltype(Vec::Zero());

// Block [i0, i0 + 4 * Vec::kWidth) of GatherRows' sum, in registers r0..r3.
inline void Gather4(const float* s, int64_t stride, const uint64_t* code, int64_t words, int64_t i0,
                    VecT& r0, VecT& r1, VecT& r2, VecT& r3) {
  r0 = Vec::Zero(), r1 = Vec::Zero(), r2 = Vec::Zero(), r3 = Vec::Zero();
  auto e0 = Vec::Zero(), e1 = Vec::Zero(), e2 = Vec::Zero(), e3 = Vec::Zero();
  for (int64_t w = 0; w < words; ++w) {
    for (uint64_t m = code[w]; m != 0;) {
      const float* row = s + (w * 64 + __builtin_ctzll(m)) * stride + i0;
      m &= m - 1;
      r0 = Vec::Add(r0, Vec::Load(row));
      r1 = Vec::Add(r1, Vec::Load(row + Vec::kWidth));
      r2 = Vec::Add(r2, Vec::Load(row + 2 * Vec::kWidth));
      r3 = Vec::Add(r3, Vec::Load(row + 3 * Vec::kWidth));
      if (m == 0) break;
      const float* next = s + (w * 64 + __builtin_ctzll(m)) * stride + i0;
      m &= m - 1;
      e0 = Vec::Add(e0, Vec::Load(next));
      e1 = Vec::Add(e1, Vec::Load(next + Vec::kWidth));
      e2 = Vec::Add(e2, Vec::Load(next + 2 * Vec::kWidth));
      e3 = Vec::Add(e3, Vec::Load(next + 3 * Vec::kWidth));
    }
  }
  r0 = Vec::Add(r0, e0);
  r1 = Vec::Add(r1, e1);
  r2 = Vec::Add(r2, e2);
  r3 = Vec::Add(r3, e3);
}

inline void GatherRows(float* acc, const float* s, int64_t stride, const uint64_t* code, int64_t words, int64_t n,
                       bool add_to = false) {
  constexpr int64_t kBlock = 4 * Vec::kWidth;
  int64_t i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    VecT r0, r1, r2, r3;
    Gather4(s, stride, code, words, i0, r0, r1, r2, r3);
    if (add_to) {
      r0 = Vec::Add(Vec::Load(acc + i0), r0);
      r1 = Vec::Add(Vec::Load(acc + i0 + Vec::kWidth), r1);
      r2 = Vec::Add(Vec::Load(acc + i0 + 2 * Vec::kWidth), r2);
      r3 = Vec::Add(Vec::Load(acc + i0 + 3 * Vec::kWidth), r3);
    }
    Vec::Store(acc + i0, r0);
    Vec::Store(acc + i0 + Vec::kWidth, r1);
    Vec::Store(acc + i0 + 2 * Vec::kWidth, r2);
    Vec::Store(acc + i0 + 3 * Vec::kWidth, r3);
  }
  if (i0 == n) return;
  if (!add_to) std::fill(acc + i0, acc + n, 0.0f);
  for (int64_t w = 0; w < words; ++w)
    for (uint64_t m = code[w]; m != 0; m &= m - 1) AddRow(acc + i0, s + (w * 64 + __builtin_ctzll(m)) * stride + i0, n - i0);
}

// Partial S of keys [j0, j1) (at most kKeyChunk) of (b, h) into part[bits][D]: row r of S is
// the sum of the V rows of the kept keys whose code has bit r. The key codes are first turned
// into one key mask per row r (kt[r]: bit j - j0 set when key j counts and has bit r), so each
// row is summed in registers by GatherRows (two alternating partial sums) 64 keys at a time,
// whose V rows stay in L1 while every row r gathers from them, and added to the row: one
// load/add/store of the row per 64 keys instead of one per (key, set bit).
constexpr int64_t kKeyWords = kKeyChunk / 64;
constexpr int64_t kRowBlock = 16;  // rows of S per task of the S phase (tasks balance over threads)

// kt[(r - r0) * kKeyWords + (j - j0) / 64] bit (j - j0) % 64 = key j of (b, h) counts and its
// code has bit r, for keys [j0, j1) (at most kKeyChunk) and rows [r0, r1) (at most kRowBlock).
// kt is zeroed here. (The AVX-512 kernel has its own, MF_KEY_MASKS: eight codes tested per
// instruction instead of one set bit at a time.)
#ifndef MF_KEY_MASKS
void KeyMasks(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
              uint64_t* kt) {
  std::fill(kt, kt + (r1 - r0) * kKeyWords, uint64_t{0});
  for (int64_t j = j0; j < j1; ++j) {
    if (p.keep != nullptr && !p.keep[b * p.tokens + j]) continue;
    const uint64_t* code = p.k_codes + ((b * p.heads + h) * p.tokens + j) * p.words;
    const uint64_t bit = uint64_t{1} << ((j - j0) % 64);
    uint64_t* col = kt + (j - j0) / 64;
    for (int64_t w = r0 / 64; w * 64 < r1; ++w) {
      uint64_t m = code[w];
      if (w * 64 < r0) m &= ~uint64_t{0} << (r0 - w * 64);          // bits below r0
      if (r1 - w * 64 < 64) m &= (uint64_t{1} << (r1 - w * 64)) - 1;  // bits from r1 on
      for (; m != 0; m &= m - 1) col[(w * 64 + __builtin_ctzll(m) - r0) * kKeyWords] |= bit;
    }
  }
}
#endif

// Rows [r0, r1) (at most kRowBlock) of the partial S of keys [j0, j1) (at most kKeyChunk) of
// (b, h), into part[r][D]: row r of S is the sum of the V rows of the kept keys whose code has
// bit r. The key codes are first turned into one key mask per row (KeyMasks), so each row is
// summed in registers by GatherRows (two alternating partial sums) 64 keys at a time, whose V
// rows stay in L1 while every row gathers from them, and added to the row: one load/add/store
// of the row per 64 keys instead of one per (key, set bit).
void PartialS(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
              float* part) {
  const int64_t d = p.depth, c = p.heads * p.depth;
  uint64_t kt[kRowBlock * kKeyWords];
  KeyMasks(p, b, h, j0, j1, r0, r1, kt);
  const float* v0 = p.v + (b * p.tokens + j0) * c + h * d;
  const int64_t key_words = (j1 - j0 + 63) / 64;
  for (int64_t kw = 0; kw < key_words; ++kw)
    for (int64_t r = r0; r < r1; ++r)
      GatherRows(part + r * d, v0 + kw * 64 * c, c, kt + (r - r0) * kKeyWords + kw, 1, d, kw > 0);
}

// Calls f(w, row) for the taps of conv(V')_t in order: row = V[b, src, h, :], skipping masked
// tokens and zero weights.
template <class F>
void ForEachTap(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t t, F&& f) {
  auto tap = [&](int64_t src, float w) {
    if (w == 0.0f || (p.keep != nullptr && !p.keep[b * p.tokens + src])) return;
    f(w, p.v + (b * p.tokens + src) * p.heads * p.depth + h * p.depth);
  };
  if (p.conv_rank == 2) {
    const float* w = p.conv + h * p.conv_k;
    const int64_t half = p.conv_k / 2;
    for (int64_t u = 0; u < p.conv_k; ++u) {
      const int64_t src = t + u - half;
      if (src >= 0 && src < p.tokens) tap(src, w[u]);
    }
    return;
  }
  const float* w = p.conv + h * p.conv_kh * p.conv_kw;
  const int64_t hh = p.conv_kh / 2, hw = p.conv_kw / 2;
  if (t < p.prefix) {
    tap(t, w[hh * p.conv_kw + hw]);
    return;
  }
  const int64_t row = (t - p.prefix) / p.grid_w, col = (t - p.prefix) % p.grid_w;
  for (int64_t a = 0; a < p.conv_kh; ++a) {
    const int64_t r = row + a - hh;
    if (r < 0 || r >= p.grid_h) continue;
    for (int64_t e = 0; e < p.conv_kw; ++e) {
      const int64_t q = col + e - hw;
      if (q >= 0 && q < p.grid_w) tap(p.prefix + r * p.grid_w + q, w[a * p.conv_kw + e]);
    }
  }
}

// The taps of conv(V')_t for one output row: out[0:D] += w * row per tap, in tap order. Taps are
// collected, then added with four vectors of the row held in registers over all of them (one
// load and store of the row per kTapBatch taps instead of one per tap); the float operations are
// the same, in the same order.
constexpr int kTapBatch = 32;
struct Taps {
  Taps(int64_t d_, float* out_) : d(d_), out(out_) {}
  int64_t d;
  float* out;
  float w[kTapBatch];           // (not zeroed: only [0, n) is read)
  const float* row[kTapBatch];
  int n = 0;

  void Add(float weight, const float* r) {
    w[n] = weight;
    row[n] = r;
    if (++n == kTapBatch) Flush();
  }

  void Flush() {
    constexpr int64_t kBlock = 4 * Vec::kWidth;
    int64_t i0 = 0;
    for (; i0 + kBlock <= d; i0 += kBlock) {
      auto a0 = Vec::Load(out + i0), a1 = Vec::Load(out + i0 + Vec::kWidth);
      auto a2 = Vec::Load(out + i0 + 2 * Vec::kWidth), a3 = Vec::Load(out + i0 + 3 * Vec::kWidth);
      for (int k = 0; k < n; ++k) {
        const auto wk = Vec::Set1(w[k]);
        const float* r = row[k] + i0;
        a0 = Vec::Add(a0, Vec::Mul(wk, Vec::Load(r)));
        a1 = Vec::Add(a1, Vec::Mul(wk, Vec::Load(r + Vec::kWidth)));
        a2 = Vec::Add(a2, Vec::Mul(wk, Vec::Load(r + 2 * Vec::kWidth)));
        a3 = Vec::Add(a3, Vec::Mul(wk, Vec::Load(r + 3 * Vec::kWidth)));
      }
      Vec::Store(out + i0, a0);
      Vec::Store(out + i0 + Vec::kWidth, a1);
      Vec::Store(out + i0 + 2 * Vec::kWidth, a2);
      Vec::Store(out + i0 + 3 * Vec::kWidth, a3);
    }
    for (int64_t i = i0; i < d; ++i) {
      float a = out[i];
      for (int k = 0; k < n; ++k) a += w[k] * row[k][i];
      out[i] = a;
    }
    n = 0;
  }
};

// conv(V')_t added into out[0:D].
void AddConv(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t t, float* out) {
  Taps taps(p.depth, out);
  ForEachTap(p, b, h, t, [&](float w, const float* row) { taps.Add(w, row); });
  taps.Flush();
}

// Y row t from z = acc[0:D]: z / max(‖z‖, 1e-12) + conv(V')_t.
void FinishRow(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t t, const float* acc, float* yrow) {
  const int64_t d = p.depth;
  // ‖z‖² with kLanes partial sums (a vectorisable order; PyTorch's differs, see the spec).
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += acc[i + l] * acc[i + l];
  float sq = 0.0f;
  for (; i < d; ++i) sq += acc[i] * acc[i];
  for (int l = 0; l < kLanes; ++l) sq += lanes[l];
  if (std::isinf(sq)) {
    // ‖z‖² overflowed float32 (some |z| above ~1.8e19, z finite): the same quotient from
    // z·2^-e, 2^e the binade of max|z| (exact scaling). Finite sums keep the path above.
    float big = 0.0f;
    for (int64_t i = 0; i < d; ++i) big = std::max(big, std::fabs(acc[i]));
    if (std::isfinite(big)) {
      int e = 0;
      std::frexp(big, &e);
      const float down = std::ldexp(1.0f, -e);
      float s2 = 0.0f;
      for (int64_t i = 0; i < d; ++i) s2 += (acc[i] * down) * (acc[i] * down);
      const float root = std::sqrt(s2);
      for (int64_t i = 0; i < d; ++i) yrow[i] = acc[i] * down / root;
      if (p.conv_rank != 0) AddConv(p, b, h, t, yrow);
      return;
    }
  }
  const float norm = std::max(std::sqrt(sq), 1e-12f);
  for (int64_t i = 0; i < d; ++i) yrow[i] = acc[i] / norm;
  if (p.conv_rank != 0) AddConv(p, b, h, t, yrow);
}

// The in-register path of Queries for a row of D = 4 vectors of kLanes floats: z of tokens ta and
// tb (two rows, so that the latency chains of one row's epilogue — the sum of the kLanes partial
// squares, sqrt, division, conv taps — overlap the other's), then Y. The same float operations in
// the same order as the general path. Returns false, with z of both rows left in za / zb (D
// floats each), when a ‖z‖² overflows: the caller takes FinishRow's rescaling for those rows.
struct RowRegs {
  VecT z0, z1, z2, z3;
};

inline void RowZ(const AddAttentionProblem& p, const float* s, int64_t b, int64_t h, int64_t t, RowRegs& r) {
  const int64_t d = p.depth, c = p.heads * p.depth;
  Gather4(s, d, p.q_codes + ((b * p.heads + h) * p.tokens + t) * p.words, p.words, 0, r.z0, r.z1, r.z2, r.z3);
  const float* vrow = p.v + (b * p.tokens + t) * c + h * d;
  const auto half = Vec::Set1(0.5f), inv_pi = Vec::Set1(kInvPi);
  r.z0 = Vec::Add(Vec::Mul(half, Vec::Load(vrow)), Vec::Mul(r.z0, inv_pi));
  r.z1 = Vec::Add(Vec::Mul(half, Vec::Load(vrow + Vec::kWidth)), Vec::Mul(r.z1, inv_pi));
  r.z2 = Vec::Add(Vec::Mul(half, Vec::Load(vrow + 2 * Vec::kWidth)), Vec::Mul(r.z2, inv_pi));
  r.z3 = Vec::Add(Vec::Mul(half, Vec::Load(vrow + 3 * Vec::kWidth)), Vec::Mul(r.z3, inv_pi));
}

// ‖z‖² in FinishRow's order: kLanes partial sums over the D / kLanes vectors, then added in lane order.
inline float RowSquares(const RowRegs& r) {
  auto sq_lanes = Vec::Mul(r.z0, r.z0);  // = 0 + z0² (a square is never -0)
  sq_lanes = Vec::Add(sq_lanes, Vec::Mul(r.z1, r.z1));
  sq_lanes = Vec::Add(sq_lanes, Vec::Mul(r.z2, r.z2));
  sq_lanes = Vec::Add(sq_lanes, Vec::Mul(r.z3, r.z3));
  float lanes[kLanes];
  Vec::Store(lanes, sq_lanes);
  float sq = 0.0f;
  for (int l = 0; l < kLanes; ++l) sq += lanes[l];
  return sq;
}

inline void RowStore(float* dst, const RowRegs& r) {
  Vec::Store(dst, r.z0);
  Vec::Store(dst + Vec::kWidth, r.z1);
  Vec::Store(dst + 2 * Vec::kWidth, r.z2);
  Vec::Store(dst + 3 * Vec::kWidth, r.z3);
}

// Y row t = z / max(√sq, 1e-12) + conv(V')_t, from registers.
inline void RowFinish(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t t, float sq, RowRegs& r) {
  const int64_t d = p.depth, c = p.heads * p.depth;
  const auto norm = Vec::Set1(std::max(std::sqrt(sq), 1e-12f));
  r.z0 = Vec::Div(r.z0, norm);
  r.z1 = Vec::Div(r.z1, norm);
  r.z2 = Vec::Div(r.z2, norm);
  r.z3 = Vec::Div(r.z3, norm);
  if (p.conv_rank != 0) {
    ForEachTap(p, b, h, t, [&](float w, const float* row) {
      const auto wv = Vec::Set1(w);
      r.z0 = Vec::Add(r.z0, Vec::Mul(wv, Vec::Load(row)));
      r.z1 = Vec::Add(r.z1, Vec::Mul(wv, Vec::Load(row + Vec::kWidth)));
      r.z2 = Vec::Add(r.z2, Vec::Mul(wv, Vec::Load(row + 2 * Vec::kWidth)));
      r.z3 = Vec::Add(r.z3, Vec::Mul(wv, Vec::Load(row + 3 * Vec::kWidth)));
    });
  }
  RowStore(p.y + (b * p.tokens + t) * c + h * d, r);
}

void Queries(const AddAttentionProblem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, float* acc) {
  const int64_t d = p.depth, c = p.heads * p.depth;
  const float* s = p.s + (b * p.heads + h) * p.bits * d;
  // A row of D = 4 vectors of kLanes floats (AVX-512, heads of 64): each row stays in registers
  // from the gather to the store of Y, two rows at a time (RowZ ... RowFinish).
  const bool in_registers = Vec::kWidth == kLanes && d == 4 * Vec::kWidth;
  int64_t t = t0;
  if (in_registers) {
    for (; t < t1; t += 2) {
      const bool two = t + 1 < t1;
      RowRegs ra, rb;
      RowZ(p, s, b, h, t, ra);
      if (two) RowZ(p, s, b, h, t + 1, rb);
      const float sa = RowSquares(ra), sb = two ? RowSquares(rb) : 0.0f;
      if (std::isinf(sa)) {  // ‖z‖² overflowed: the general path's rescaling, from z
        RowStore(acc, ra);
        FinishRow(p, b, h, t, acc, p.y + (b * p.tokens + t) * c + h * d);
      } else {
        RowFinish(p, b, h, t, sa, ra);
      }
      if (!two) break;
      if (std::isinf(sb)) {
        RowStore(acc, rb);
        FinishRow(p, b, h, t + 1, acc, p.y + (b * p.tokens + t + 1) * c + h * d);
      } else {
        RowFinish(p, b, h, t + 1, sb, rb);
      }
    }
    return;
  }
  for (; t < t1; ++t) {
    const float* vrow = p.v + (b * p.tokens + t) * c + h * d;
    GatherRows(acc, s, d, p.q_codes + ((b * p.heads + h) * p.tokens + t) * p.words, p.words, d);
    for (int64_t i = 0; i < d; ++i) acc[i] = 0.5f * vrow[i] + acc[i] * kInvPi;
    FinishRow(p, b, h, t, acc, p.y + (b * p.tokens + t) * c + h * d);
  }
}

void Run(const AddAttentionProblem& p, const Parallel& par) {
  const int64_t bh = p.batch * p.heads, sd = p.bits * p.depth;
  const int64_t key_chunks = std::max<int64_t>(1, (p.tokens + kKeyChunk - 1) / kKeyChunk);
  const int64_t row_blocks = (p.bits + kRowBlock - 1) / kRowBlock;
  // Phase 1: partial S per (b, h, key chunk, block of rows), straight into S with one key chunk;
  // phase 2: sum the chunks in order.
  std::vector<float> parts(key_chunks > 1 ? static_cast<size_t>(bh * key_chunks * sd) : 0);
  float* dst = key_chunks > 1 ? parts.data() : p.s;
  par.For(static_cast<size_t>(bh * key_chunks * row_blocks), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) / row_blocks, rb = static_cast<int64_t>(task) % row_blocks;
    const int64_t g = i / key_chunks, chunk = i % key_chunks;
    const int64_t j0 = chunk * kKeyChunk, j1 = std::min(p.tokens, j0 + kKeyChunk);
    const int64_t r0 = rb * kRowBlock, r1 = std::min(p.bits, r0 + kRowBlock);
    PartialS(p, g / p.heads, g % p.heads, j0, j1, r0, r1, dst + i * sd);
  });
  if (key_chunks > 1) {
    par.For(static_cast<size_t>(bh), [&](size_t g) {
      float* s = p.s + static_cast<int64_t>(g) * sd;
      const float* first = parts.data() + static_cast<int64_t>(g) * key_chunks * sd;
      std::copy(first, first + sd, s);
      for (int64_t k = 1; k < key_chunks; ++k) AddRow(s, first + k * sd, sd);
    });
  }
  // Phase 3: outputs per (b, h, query chunk).
  const int64_t query_chunks = (p.tokens + kQueryChunk - 1) / kQueryChunk;
  par.For(static_cast<size_t>(bh * query_chunks), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task), g = i / query_chunks, chunk = i % query_chunks;
    std::vector<float> acc(static_cast<size_t>(p.depth));
    const int64_t t0 = chunk * kQueryChunk;
    Queries(p, g / p.heads, g % p.heads, t0, std::min(p.tokens, t0 + kQueryChunk), acc.data());
  });
}
