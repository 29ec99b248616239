// ShiftLinear's AVX-512 kernel alone, single thread, no ORT: fastest of many calls, in MACs per
// TSC cycle (BENCHMARKS.md divides by the core/TSC clock ratio for MACs per core cycle; µs assume a 2.3 GHz TSC).
//   g++ -O2 -std=c++17 -Iort_ops/src -I"$(.venv/bin/python -c 'import setup; print(setup.ort_include_dir())')" \
//       bench/shift_linear_macs.cc ort_ops/src/shift_linear_avx512.cc ort_ops/src/shift_linear_pack.cc \
//       ort_ops/src/aligned_buffer.cc ort_ops/src/cpu_isa.cc -o /tmp/shift_linear_macs
//   /tmp/shift_linear_macs [terms=1] [act_bits=32] [cold=0]
// cold=1: 8 MiB are written between calls (more than L2), so the codes come from L3 as in ORT
// between interleaved sessions (batch 1: 30 vs 21 us).
#include <x86intrin.h>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "shift_linear_kernels.h"
using namespace mfconvert;
int main(int argc, char** argv) {
  int terms = argc > 1 ? atoi(argv[1]) : 1;
  int act_bits = argc > 2 ? atoi(argv[2]) : 32;
  bool cold = argc > 3 && atoi(argv[3]) != 0;
  std::vector<char> junk(cold ? 8 << 20 : 0);
  int shapes[][3] = {{197,192,768},{197,768,192},{128,384,1536},{1,384,1536}};
  std::mt19937 rng(1);
  for (auto& s : shapes) {
    int rows=s[0], in=s[1], out=s[2];
    ShiftLinearAttrs a; a.in_features=in; a.out_features=out; a.terms=terms; a.act_bits=act_bits; a.act_frac_bits = act_bits==32?16:8;
    std::vector<uint8_t> codes((size_t(terms)*in*out*5+7)/8); for (auto& c: codes) c=rng();
    std::vector<int8_t> e(out, 0); std::vector<float> b(out, 0.5f);
    PackedShiftLinear p; std::string err = PackShiftLinear(a, Isa::kAvx512, codes.data(), e.data(), b.data(), &p);
    if (!err.empty()) { printf("%s\n", err.c_str()); return 1; }
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> x(size_t(rows)*in); for (auto& v: x) v = nd(rng);
    std::vector<float> wide; const float* xd = x.data();
    if (terms > 1 && p.lut_terms == 1) { WidenRows(x.data(), rows, in, terms, &wide); xd = wide.data(); }
    std::vector<float> y(size_t(rows)*out);
    AlignedBuffer scratch; Parallel par(nullptr);
    uint64_t best = ~0ull;
    int reps = rows == 1 ? 5000 : (rows > 200 ? 40 : 300);
    for (int k = 0; k < reps; ++k) { for (size_t j = 0; j < junk.size(); j += 64) junk[j]++; uint64_t t = __rdtsc(); ShiftLinearAvx512(p, xd, rows, y.data(), par, scratch); t = __rdtsc() - t; if (t < best) best = t; }
    double macs = double(rows)*in*out*terms;
    printf("%5d x %4d x %4d T=%d A=%d%s: %8.1f us  %.2f MACs/tsc-cycle  \n", rows,in,out,terms,act_bits, cold ? " cold" : "", best/2300.0, macs/best);
  }
}
