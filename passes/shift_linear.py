"""Pass `shift-linear`: linear layers (MatMul/Gemm with a constant weight, optional bias Add)
become ShiftLinear ops whose weights are signed powers of two (DeepShift; docs/ops.md)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx_graphsurgeon as gs

from mfconvert.nn import pow2
from mfconvert.passes.graph import claimant, node_label
from mfconvert.passes.linear import match_linear, shift_linear_node, weight_warnings
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.passes.targeting import Targeting, exclusion_reason

NAME = "shift-linear"


@dataclass
class ShiftLinearConfig(ShiftFormat, Targeting):
    """The ShiftLinear format (weight_bits, act_bits, act_frac_bits, weight_scale, terms: ShiftFormat)
    and which linears to convert (include/exclude: Targeting)."""
    min_params: int = 1024
    # Fractional bits per activation tensor name, from calibration (calibrate/activation_stats.py);
    # a linear whose input is not listed uses act_frac_bits.
    act_frac_bits_by_input: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for frac_bits in self.act_frac_bits_by_input.values():
            pow2.check_format(self.weight_bits, self.act_bits, frac_bits)
        self.check_targeting()


# Integer matrix products: their activation input is itself quantised (uint8/int8, with its scale
# and zero point computed at run time or fixed), and their output is int32 (MatMulInteger) or
# requantised (QLinearMatMul); ShiftLinear takes and gives float32, so replacing one means
# rewriting its quantise/dequantise neighbours too. Reported as skipped.
_INTEGER_MATMULS = {
    op: f"{op} multiplies integer activations (quantised at run time) and gives "
        + ("int32" if op == "MatMulInteger" else "requantised integers")
        + "; ShiftLinear takes and gives float32, so it is left as it is (a QDQ model's DequantizeLinear "
          "→ MatMul converts)"
    for op in ("MatMulInteger", "QLinearMatMul")}


@register(NAME, ShiftLinearConfig, "MatMul/Gemm with constant weights → ShiftLinear (w = ±2^p, or a sum of terms)")
def run(graph: gs.Graph, cfg: ShiftLinearConfig) -> PassResult:
    result = PassResult(NAME)
    candidates = [n for n in graph.nodes if n.op in ("MatMul", "Gemm", *_INTEGER_MATMULS)
                  and (n.domain or "") in ("", "ai.onnx") and claimant(graph, n) is None]
    for node in candidates:
        label = node_label(node)
        if node.op in _INTEGER_MATMULS:
            result.skip(label, _INTEGER_MATMULS[node.op])
            continue
        reason = exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        match = match_linear(graph, node)
        if isinstance(match, str):
            result.skip(label, match)
            continue
        out_features, in_features = match.weight.shape
        if in_features * out_features < cfg.min_params:
            result.skip(label, f"tiny layer: {in_features}×{out_features} < min_params={cfg.min_params}")
            continue
        frac_bits = cfg.act_frac_bits_by_input.get(match.activation.name, cfg.act_frac_bits)
        terms = cfg.terms_for(label)
        new, nbytes = shift_linear_node(label, match.activation, match.output, match.weight, match.bias,
                                        replace(cfg, act_frac_bits=frac_bits, terms=terms))
        warnings = weight_warnings(label, match.weight, new.inputs[2].values, cfg)   # inputs[2]: exponents
        for old in match.nodes:
            old.outputs.clear()
        graph.nodes.append(new)
        before = match.weight.size * match.weight_itemsize + (0 if match.bias is None else match.bias.size * 4)
        fused = " + bias Add" if len(match.nodes) > 1 else ""
        result.changes.append(LayerChange(
            NAME, label, "ShiftLinear", in_features, out_features, before, nbytes,
            activation=match.activation.name, detail=f"{node.op}{fused}, {cfg.weight_bits}-bit codes"
                   + (f" × {terms} terms" if terms > 1 else "")
                   + (f"; weights dequantised from {match.dequantised}" if match.dequantised else ""),
            warnings=warnings))
    graph.cleanup().toposort()
    return result
