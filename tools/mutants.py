"""Planted bugs for tools/mutation.py: each is one exact snippet of one file (it must occur there
exactly once), its replacement, and the tests (pytest arguments) expected to catch it. At least
one per face (pass, PyTorch layer, kernel) of each op, and the two MoE training bugs that once
survived the whole suite (issue 16)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    face: str            # what it breaks: "<op> <face>"
    path: str            # relative to the repository root
    original: str
    replacement: str
    tests: tuple[str, ...]


MOE_TRAIN = ("tests/test_moe_mlp_gradients.py", "tests/test_moe_mlp_training.py")
MOE_REF = ("tests/test_moe_mlp_reference.py", "tests/test_moe_mlp_parity.py")
SHIFT_KERNEL = ("tests/test_shift_linear_kernel.py",)
ATTN_REF = ("tests/test_add_attention_reference.py", "tests/test_add_attention_kernel.py")

MUTANTS = [
    # -- ShiftMoEMLP --------------------------------------------------------------------------
    Mutant("moe-gate-detached", "MoE layer (training)", "nn/moe_mlp.py",
           "gate = probs.gather(1, expert.unsqueeze(1))",
           "gate = probs.gather(1, expert.unsqueeze(1)).detach()", MOE_TRAIN),
    Mutant("moe-load-without-ste", "MoE layer (training)", "nn/moe_mlp.py",
           "load = (hard + probs - probs.detach()).sum(0)", "load = hard.sum(0)", MOE_TRAIN),
    Mutant("moe-layer-gate-is-mult-probability", "MoE layer", "nn/moe_mlp.py",
           "gate = probs.gather(1, expert.unsqueeze(1))", "gate = probs[:, :1]", MOE_REF),
    Mutant("moe-layer-shift-expert-tensor-scale", "MoE layer", "nn/moe_mlp.py",
           "weight_scale=weight_scale, terms=terms, mode=mode)", "weight_scale=\"tensor\", terms=terms, mode=mode)",
           MOE_REF),
    Mutant("moe-pass-gate-dropped", "MoE pass", "passes/moe_mlp.py",
           'gated = emit("Mul", [merged, gate], "gated")', 'gated = emit("Identity", [merged], "gated")', MOE_REF),
    Mutant("moe-pass-router-seed", "MoE pass", "passes/moe_mlp.py",
           "router_init(d, cfg.router_std, cfg.router_bias, cfg.seed)",
           "router_init(d, cfg.router_std, cfg.router_bias, cfg.seed + 1)", MOE_REF),
    # -- ShiftLinear --------------------------------------------------------------------------
    Mutant("shift-rounding-threshold", "ShiftLinear rounding (pass and layer)", "nn/pow2.py",
           "((bits & 0x7FFFFF) >= 0x3504F4)", "((bits & 0x7FFFFF) >= 0x3A0000)",
           ("tests/test_nn_shift_linear.py", "tests/test_shift_linear_pass.py")),
    Mutant("shift-layer-saturates", "ShiftLinear layer", "nn/shift_linear.py",
           "wrapped = ((acc.to(torch.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)",
           "wrapped = acc.to(torch.int64).clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)",
           ("tests/test_nn_shift_linear.py",)),
    Mutant("shift-pass-drops-act-frac-bits", "ShiftLinear pass", "passes/linear.py",
           '"act_bits": cfg.act_bits, "act_frac_bits": cfg.act_frac_bits, ', '"act_bits": cfg.act_bits, ',
           ("tests/test_shift_linear_pass.py", "tests/test_shift_linear_pass_formats.py")),
    Mutant("shift-kernel-negates-before-shift", "ShiftLinear kernel (scalar)", "ort_ops/src/shift_linear_scalar.cc",
           "acc += (c[i] >> 4) ? 0u - t : t;",
           "acc += (c[i] >> 4) ? static_cast<uint32_t>((-xq[i]) >> (c[i] & 15)) : t;", SHIFT_KERNEL),
    Mutant("shift-kernel-avx2-drops-bias", "ShiftLinear kernel (AVX2)", "ort_ops/src/shift_linear_avx2.cc",
           "_mm256_add_ps(_mm256_mul_ps(f, scale), bias)", "_mm256_add_ps(_mm256_mul_ps(f, scale), _mm256_setzero_ps())",
           SHIFT_KERNEL),
    Mutant("shift-kernel-avx512-drops-bias", "ShiftLinear kernel (AVX-512)", "ort_ops/src/shift_linear_avx512.cc",
           "_mm512_add_ps(_mm512_mul_ps(f, scale), bias)", "_mm512_add_ps(_mm512_mul_ps(f, scale), _mm512_setzero_ps())",
           SHIFT_KERNEL),
    # -- AddLinearAttention -------------------------------------------------------------------
    Mutant("attn-kernel-inv-pi-1pc", "AddLinearAttention kernel", "ort_ops/src/add_attention_impl.h",
           "static_cast<float>(0.31830988618379067154)", "static_cast<float>(0.32149298504562857826)", ATTN_REF),
    Mutant("attn-kernel-mask-threshold", "AddLinearAttention kernel", "ort_ops/src/add_attention_op.cc",
           "constexpr float kMaskedBelow = -1000.0f;", "constexpr float kMaskedBelow = -999.0f;", ATTN_REF),
    Mutant("attn-kernel-avx512-tail", "AddLinearAttention kernel (AVX-512)", "ort_ops/src/add_attention_avx512.cc",
           "static_cast<__mmask16>((1u << n) - 1)", "static_cast<__mmask16>((1u << n) - 2)", ATTN_REF),
    Mutant("attn-kernel-ksh-sigma-of-head-0", "AddLinearAttention kernel (ksh)", "ort_ops/src/add_attention_op.cc",
           "const double two_sigma = 2.0 * static_cast<double>(sigma[h]);",
           "const double two_sigma = 2.0 * static_cast<double>(sigma[0]);", ATTN_REF),
    Mutant("attn-layer-ksh-sigma-not-doubled", "AddLinearAttention layer (ksh)", "nn/add_attention.py",
           "gauss = torch.exp(-d2 / (2 * self.sigma.to(xn.dtype))[None, :, None, None])",
           "gauss = torch.exp(-d2 / (self.sigma.to(xn.dtype))[None, :, None, None])",
           ("tests/test_add_attention_reference.py", "tests/test_add_attention_layer.py")),
    Mutant("attn-layer-inv-pi-1pc", "AddLinearAttention layer", "nn/add_attention.py",
           "INV_PI = 1.0 / math.pi", "INV_PI = 1.01 / math.pi",
           ("tests/test_add_attention_reference.py", "tests/test_add_attention_layer.py")),
    Mutant("attn-layer-masked-v-in-z", "AddLinearAttention layer", "nn/add_attention.py",
           "z = 0.5 * vh + (qb @ s) * INV_PI", "z = 0.5 * vh_masked + (qb @ s) * INV_PI",
           ("tests/test_add_attention_reference.py", "tests/test_add_attention_layer.py")),
    Mutant("attn-pass-drops-mask", "AddLinearAttention pass", "passes/add_attention.py",
           "inputs = [q, k, v] + ([m.mask] if m.mask is not None else [])", "inputs = [q, k, v]",
           ("tests/test_add_attention_pass.py", "-k", "mask")),
    # -- AdderConv ----------------------------------------------------------------------------
    Mutant("adder-layer-no-floor", "AdderConv layer", "nn/adder_conv.py",
           "x_q = pow2.quantize_activation(x, self.act_bits, self.act_frac_bits).to(torch.float64)",
           "x_q = torch.round(x.double() * 2.0 ** self.act_frac_bits)", ("tests/test_adder_conv_layer.py",)),
    Mutant("adder-layer-sign-not-hardtanh", "AdderConv layer (training)", "nn/adder_conv.py",
           "clipped = (weight.unsqueeze(1) - x.unsqueeze(2)).clamp_(-1, 1)",
           "clipped = (weight.unsqueeze(1) - x.unsqueeze(2)).sign_()", ("tests/test_adder_conv_layer.py",)),
    Mutant("adder-pass-shift-add-unmixed", "AdderConv pass (shift-add-conv)", "passes/adder_conv.py",
           "a_inv = np.kron(np.eye(g), np.linalg.inv(block))", "a_inv = np.kron(np.eye(g), block)",
           ("tests/test_adder_conv_pass.py", "-k", "shift_add")),
]
