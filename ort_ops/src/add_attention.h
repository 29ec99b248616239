// AddLinearAttention (docs/ops.md#addlinearattention): binarised linear attention whose products
// against V are additions. The op (add_attention_op.cc) checks shapes and computes the codes;
// the per-ISA kernels (add_attention_{scalar,avx2,avx512}.cc) do the masked accumulation.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.h"

namespace mfconvert {

// One Compute's problem, all pointers into ORT's tensors or the op's scratch.
struct AddAttentionProblem {
  int64_t batch = 0, tokens = 0, heads = 0, depth = 0;   // B, T, H, D (C = H * D)
  int64_t bits = 0;                  // code bits per token: D (sign) or nbits (ksh)
  int64_t words = 0;                 // uint64 words per code: ceil(bits / 64)
  const float* v = nullptr;          // [B, T, C]
  float* y = nullptr;                // [B, T, C]
  const uint64_t* q_codes = nullptr; // [B, H, T, words]
  const uint64_t* k_codes = nullptr; // [B, H, T, words]
  const uint8_t* keep = nullptr;     // [B, T] 1 = key counts, or null (all count)
  float* s = nullptr;                // scratch [B, H, bits, D]: Σ over kept keys of V rows
  // conv on V' (masked V): rank 2 [H, k] along tokens, rank 3 [H, kh, kw] on a grid
  const float* conv = nullptr;
  int conv_rank = 0;
  int64_t conv_k = 0, conv_kh = 0, conv_kw = 0;
  int64_t grid_h = 0, grid_w = 0, prefix = 0;
};

// S = K_bᵀ V' then Y = normalize(0.5 V + (1/π) Q_b S) + conv(V'), additions only for S and Q_b S.
void AddAttentionScalar(const AddAttentionProblem& p, const Parallel& par);
void AddAttentionAvx2(const AddAttentionProblem& p, const Parallel& par);
void AddAttentionAvx512(const AddAttentionProblem& p, const Parallel& par);

// The sign codes with τ = 0: bit d of out[0:ceil(depth / 64)] is x[d] > 0 (false for NaN).
void PositiveBitsScalar(const float* x, int64_t depth, uint64_t* out);
void PositiveBitsAvx2(const float* x, int64_t depth, uint64_t* out);
void PositiveBitsAvx512(const float* x, int64_t depth, uint64_t* out);

}  // namespace mfconvert
