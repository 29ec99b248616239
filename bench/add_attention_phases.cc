// AddLinearAttention's AVX-512 kernel alone, single thread, no ORT: the phases at 197 tokens,
// 3 heads of 64, sign codes, 9-tap token conv (bench_add_attention.py's configuration), fastest of
// 3,000 calls each, µs at a 2.3 GHz TSC. The kernel file is included, so its internal phases can be
// timed (codes: PositiveBits of Q and K; S: PartialS of every head; Queries: Q_b·S, z, the norm
// and the conv; Run: the whole kernel after the codes).
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-math-errno -Iort_ops/src \
//       -I"$(.venv/bin/python -c 'import setup; print(setup.ort_include_dir())')" \
//       bench/add_attention_phases.cc -o /tmp/add_attention_phases
//   /tmp/add_attention_phases        (NOCONV=1: without the conv)
#include <x86intrin.h>
#include <cstdio>
#include <cstdlib>
#include <random>
#include "add_attention_avx512.cc"
using namespace mfconvert;
int main() {
  const int64_t T = 197, H = 3, D = 64, C = H * D;
  std::mt19937 rng(1); std::normal_distribution<float> nd(0, 1);
  std::vector<float> q(T*C), k(T*C), v(T*C), y(T*C), s(H*D*D), conv(H*9);
  for (auto* vec : {&q, &k, &v}) for (auto& x : *vec) x = nd(rng);
  for (auto& x : conv) x = 0.1f * nd(rng);
  std::vector<uint64_t> qc(H*T), kc(H*T);
  auto codes = [&]() { for (int64_t h = 0; h < H; ++h) for (int64_t t = 0; t < T; ++t) {
    PositiveBitsAvx512(q.data() + t*C + h*D, D, &qc[h*T+t]); PositiveBitsAvx512(k.data() + t*C + h*D, D, &kc[h*T+t]); } };
  AddAttentionProblem p; p.batch=1; p.tokens=T; p.heads=H; p.depth=D; p.bits=D; p.words=1;
  p.v=v.data(); p.y=y.data(); p.q_codes=qc.data(); p.k_codes=kc.data(); p.s=s.data(); p.conv=conv.data();
  p.conv_rank=getenv("NOCONV")?0:2; p.conv_k=9;
  Parallel par(nullptr);
  std::vector<float> acc(D);
  uint64_t best[4] = {~0ull, ~0ull, ~0ull, ~0ull};
  for (int it = 0; it < 3000; ++it) {
    uint64_t t0 = __rdtsc(); codes();
    uint64_t t1 = __rdtsc();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < D; r += kRowBlock) PartialS(p, 0, h, 0, T, r, std::min(D, r + kRowBlock), s.data() + h*D*D);
    uint64_t t2 = __rdtsc(); for (int64_t h = 0; h < H; ++h) Queries(p, 0, h, 0, T, acc.data());
    uint64_t t3 = __rdtsc(); AddAttentionAvx512(p, par);
    uint64_t t4 = __rdtsc();
    uint64_t d[4] = {t1-t0, t2-t1, t3-t2, t4-t3};
    for (int i = 0; i < 4; ++i) best[i] = std::min(best[i], d[i]);
  }
  printf("codes %.1f  S %.1f  Queries(+conv) %.1f  Run %.1f us (TSC 2.3 GHz)\n", best[0]/2300., best[1]/2300., best[2]/2300., best[3]/2300.);
  double sum = 0; for (float x : y) sum += x; printf("checksum %.6f\n", sum);
}
