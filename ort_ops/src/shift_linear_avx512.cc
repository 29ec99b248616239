// ShiftLinear with AVX-512 (F, BW, DQ, VL), selected at run time.
//
// Vectorised over outputs (16 per zmm). Per token and input, a 32-entry table holds t(c) for
// every normalised code c = sign << 4 | m: x_q >> m, -(x_q >> m), and 0 for the zero code
// (one vpsravd against 0..15 and one negation build it). A weight is then a table lookup
// (vpermt2d indexed by the code bytes) and an add, per 16 MACs: no multiplication. A task
// takes up to 4 tokens x 64 outputs into 16 accumulators; the code bytes [group][i][t][64] are
// loaded once per input and term for the 4 tokens, as one zmm whose dword shifts by 0/8/16/24
// give the 4 blocks' indices (port 0; a byte-to-dword widening would take port 5 from the
// lookups). Inputs are processed in blocks of kInBlock so the tables of a block stay in L1 while
// every output group walks over it; with T terms the table of an input serves all T.
//
// Limit (measured on the Intel AVX-512 VM of BENCHMARKS.md): one vpermt2d per cycle (port 5)
// and two vpaddd, so 16 MACs per cycle per core at most; per input and 4 tokens x 64 outputs
// this loop issues 16 lookups + 16 adds + 3 shifts on ports 0/5, i.e. <= 14.6 MACs per cycle.
//
// (A token-vectorised variant, vpsravd + vpaddd per 16 MACs as in shift_linear_avx2.cc, was
// measured 1.2-2.2x slower on Zen 5: it needs two vector ALU ops per 16 MACs to this path's
// one shuffle and one add, plus a shift-count broadcast per weight.)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "shift_linear_kernels.h"

#define MF_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace mfconvert {

namespace {

constexpr int kLutTokens = 4;       // tokens per task (4 x 4 zmm accumulators)
constexpr int64_t kInBlock = 64;     // inputs per block: 4 tokens' tables are 32 KiB (L1)
constexpr int64_t kGroupTasks = 8;   // from this many token groups on, one task per group
constexpr int64_t kLutBudget = int64_t{8} << 20;  // few rows: all tables at once up to this size
constexpr size_t kTaskStackBytes = size_t{64} << 10;  // a task's scratch up to this size on the stack
constexpr int64_t kPrefetchBytes = 1024;  // few rows: codes are prefetched this far ahead (at batch 1 from L3)
constexpr int64_t kFewRowsTaskMacs = int64_t{1} << 20;  // few rows: the least MACs per task (see below)

MF_AVX512 inline __m512i Quantize16(__m512 x, const ActQuant& q) {
  const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(q.scale)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512i r = _mm512_cvttps_epi32(f);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, _mm512_set1_ps(q.hi), _CMP_GE_OQ),
                            _mm512_set1_epi32(q.qhi));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, _mm512_set1_ps(q.lo), _CMP_LE_OQ),
                            _mm512_set1_epi32(q.qlo));
  return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), r);  // NaN -> 0
}

MF_AVX512 inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// The 32-entry tables of one token: lut[i][c] = t(c) for input i.
MF_AVX512 void BuildLuts(const float* x, int64_t in, const ActQuant& q, int32_t* lut) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) int32_t xq[16];
  for (int64_t i0 = 0; i0 < in; i0 += 16) {
    const int64_t ni = std::min<int64_t>(16, in - i0);
    _mm512_store_si512(xq, Quantize16(_mm512_maskz_loadu_ps(FirstLanes(ni), x + i0), q));
    for (int k = 0; k < ni; ++k) {
      // lanes 0..14: x >> m; lane 15 (kZeroCode): 0; the second half negated.
      const __m512i pos = _mm512_maskz_srav_epi32(0x7FFF, _mm512_set1_epi32(xq[k]), iota);
      int32_t* l = lut + (i0 + k) * 32;
      _mm512_store_si512(l, pos);
      _mm512_store_si512(l + 16, _mm512_sub_epi32(_mm512_setzero_si512(), pos));
    }
  }
}

// Accumulates inputs [i0, i0 + n) for outputs [64 g, 64 g + 64) of NT tokens into acc (16 zmm,
// [token][16-output block]); lut points at input i0 of token 0, tokens lut_stride apart. With
// `first` the accumulators start at 0; with `last` they are rescaled into y (rows `out` apart).
template <int NT, bool kPrefetch>
MF_AVX512 void LutSpan(const int32_t* lut, int64_t lut_stride, const PackedShiftLinear& p, int64_t g,
                       int64_t i0, int64_t n, __m512i* acc_mem, bool first, bool last, float* y) {
  const int64_t in = p.attrs.in_features, out = p.attrs.out_features;  // in: T * X's columns
  const int terms = p.lut_terms;
  const uint8_t* codes = p.lut_codes.As<uint8_t>() + (g * in + i0 * terms) * kLutOut;
  __m512i acc[NT][4];
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) acc[t][b] = first ? _mm512_setzero_si512() : acc_mem[t * 4 + b];
  for (int64_t i = 0; i < n; ++i, lut += 32)
  for (int k = 0; k < terms; ++k, codes += kLutOut) {  // the T terms of input i share its table
    if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBytes), _MM_HINT_T0);
    // Block b's codes are byte b of each dword (shift_linear_pack.h); vpermt2d reads bits 0-4.
    __m512i idx[4];
    idx[0] = _mm512_load_si512(codes);
    idx[1] = _mm512_srli_epi32(idx[0], 8);
    idx[2] = _mm512_srli_epi32(idx[0], 16);
    idx[3] = _mm512_srli_epi32(idx[0], 24);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const int32_t* l = lut + t * lut_stride;
      const __m512i lo = _mm512_load_si512(l), hi = _mm512_load_si512(l + 16);
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b)
        acc[t][b] = _mm512_add_epi32(acc[t][b], _mm512_permutex2var_epi32(lo, idx[b], hi));
    }
  }
  if (!last) {
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) acc_mem[t * 4 + b] = acc[t][b];
    return;
  }
  // y = float(acc) * 2^(e_o - F) + b_o (cvtdq2ps rounds to nearest even; no FMA).
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    const int64_t o = g * kLutOut + b * 16;
    if (o >= out) break;
    const __mmask16 m = FirstLanes(out - o);
    const __m512 scale = _mm512_loadu_ps(p.scale.data() + o);
    const __m512 bias = _mm512_loadu_ps(p.bias.data() + o);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const __m512 f = _mm512_cvtepi32_ps(acc[t][b]);
      _mm512_mask_storeu_ps(y + t * out + o, m, _mm512_add_ps(_mm512_mul_ps(f, scale), bias));
    }
  }
}

// kPrefetch: few rows, where the codes stream from L3 (batch 1) and are read once per token group;
// with many rows they are in L2 and a prefetch per code load cost 5-10 % (197 x 768 x 192).
template <bool kPrefetch>
MF_AVX512 void LutSpanN(int nt, const int32_t* lut, int64_t lut_stride, const PackedShiftLinear& p,
                        int64_t g, int64_t i0, int64_t n, __m512i* acc, bool first, bool last, float* y) {
  switch (nt) {
    case 1: LutSpan<1, kPrefetch>(lut, lut_stride, p, g, i0, n, acc, first, last, y); break;
    case 2: LutSpan<2, kPrefetch>(lut, lut_stride, p, g, i0, n, acc, first, last, y); break;
    case 3: LutSpan<3, kPrefetch>(lut, lut_stride, p, g, i0, n, acc, first, last, y); break;
    default: LutSpan<4, kPrefetch>(lut, lut_stride, p, g, i0, n, acc, first, last, y); break;
  }
}

// Tokens [r0, r0 + nt) x output groups [g0, g1). `lut` holds those tokens' tables for all
// inputs (in * 32 int32 per token) or is null: then they are built here, one input block at a
// time, into the task's own scratch (accumulators and one block's tables: 16 * out bytes + 32 KiB).
void LutTask(const float* x, const int32_t* lut, const PackedShiftLinear& p, int64_t r0, int nt,
             int64_t g0, int64_t g1, float* y, bool prefetch) {
  const int64_t in = p.attrs.in_features / p.lut_terms, out = p.attrs.out_features;  // X's columns
  const size_t acc_bytes = static_cast<size_t>((g1 - g0) * 16 * 64);
  const size_t lut_bytes = lut ? 0 : static_cast<size_t>(kLutTokens * kInBlock * 32 * 4);
  // On the stack up to 64 KiB (out <= 2048): a task of a few tokens is ~10^4-10^5 MACs, and a
  // heap allocation per task cost ~5 % of the time (ShiftConv's many-token strips, bench_conv.py).
  alignas(64) uint8_t stack[kTaskStackBytes];
  AlignedBuffer heap;
  uint8_t* base = stack;
  if (acc_bytes + lut_bytes > sizeof(stack)) {
    heap.Reserve(acc_bytes + lut_bytes);
    base = heap.As<uint8_t>();
  }
  __m512i* acc = reinterpret_cast<__m512i*>(base);
  int32_t* local = reinterpret_cast<int32_t*>(base + acc_bytes);
  for (int64_t i0 = 0; i0 < in; i0 += kInBlock) {
    const int64_t n = std::min<int64_t>(kInBlock, in - i0);
    const int32_t* l;
    int64_t stride;
    if (lut) {
      l = lut + r0 * in * 32 + i0 * 32;
      stride = in * 32;
    } else {
      for (int t = 0; t < nt; ++t) BuildLuts(x + (r0 + t) * in + i0, n, p.quant, local + t * kInBlock * 32);
      l = local;
      stride = kInBlock * 32;
    }
    const bool first = i0 == 0, last = i0 + n == in;
    for (int64_t g = g0; g < g1; ++g) {
      if (prefetch) {
        LutSpanN<true>(nt, l, stride, p, g, i0, n, acc + (g - g0) * 16, first, last, y + r0 * out);
      } else {
        LutSpanN<false>(nt, l, stride, p, g, i0, n, acc + (g - g0) * 16, first, last, y + r0 * out);
      }
    }
  }
}

}  // namespace

void ShiftLinearAvx512(const PackedShiftLinear& p, const float* x, int64_t rows, float* y,
                       const Parallel& par, AlignedBuffer& scratch) {
  if (rows <= 0) return;
  const int64_t in = p.attrs.in_features / p.lut_terms;  // X's columns (not widened)
  const int64_t token_groups = (rows + kLutTokens - 1) / kLutTokens;
  if (token_groups >= kGroupTasks) {
    // One task per token group: its tables are built block by block and stay in L1.
    par.For(static_cast<size_t>(token_groups), [&](size_t tg) {
      const int64_t r0 = static_cast<int64_t>(tg) * kLutTokens;
      LutTask(x, nullptr, p, r0, static_cast<int>(std::min<int64_t>(kLutTokens, rows - r0)), 0,
              p.lut_groups, y, false);
    });
    return;
  }
  // Few rows: split the outputs too. The tables of every row are built once when they fit
  // kLutBudget; else (a wide layer) every task builds its tokens' tables block by block.
  const bool shared = rows * in * 32 * 4 <= kLutBudget;
  int32_t* lut = nullptr;
  if (shared) {
    scratch.Reserve(static_cast<size_t>(rows * in * 32 * 4));
    lut = scratch.As<int32_t>();
    par.For(static_cast<size_t>(rows), [&](size_t r) {
      BuildLuts(x + r * in, in, p.quant, lut + r * in * 32);
    });
  }
  // Output groups per task: at least kFewRowsTaskMacs MACs each (~30 us of kernel), so a task
  // outweighs handing it to a pool thread that has to be woken (with spinning off it arrives late:
  // batch 1, 384 x 1536, one term, 2 free cores, fastest calls in ORT: 4 tasks 39-40 us, one task
  // 34 us); at most about kGroupTasks tasks in all, as before.
  const int64_t group_macs = std::min<int64_t>(rows, kLutTokens) * p.attrs.in_features * kLutOut;
  const int64_t per_task = std::max({int64_t{1}, p.lut_groups * token_groups / kGroupTasks,
                                     std::min(p.lut_groups, (kFewRowsTaskMacs + group_macs - 1) / group_macs)});
  const int64_t chunks = (p.lut_groups + per_task - 1) / per_task;
  par.For(static_cast<size_t>(token_groups * chunks), [&](size_t task) {
    const int64_t r0 = static_cast<int64_t>(task) / chunks * kLutTokens;
    const int64_t g0 = static_cast<int64_t>(task) % chunks * per_task;
    LutTask(x, lut, p, r0, static_cast<int>(std::min<int64_t>(kLutTokens, rows - r0)), g0,
            std::min(p.lut_groups, g0 + per_task), y, true);
  });
}

}  // namespace mfconvert
