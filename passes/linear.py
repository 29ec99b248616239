"""Linear layers in a graph: find one (MatMul/Gemm with a constant weight, optional bias Add), and
build the ShiftLinear node that replaces one. Shared by the passes that rewrite linears; kept out
of the passes' own modules so importing it registers no pass (registration order is run order)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import torch

from mfconvert.nn import pow2
from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.graph import (NotConstant, constant_value, dequantised_from, graph_opset, sole_consumer,
                                    tensor_dtype)
from mfconvert.passes.registry import PassError


@dataclass
class LinearMatch:
    """A linear layer found in the graph: y = x @ weight.T + bias, weight [out, in]."""
    nodes: list[gs.Node]          # the nodes the rewrite replaces (MatMul/Gemm [, Add])
    activation: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    output: gs.Tensor
    # How the weight was stored when it is an integer one dequantised (DequantizeLinear), e.g.
    # "int8 (per-channel, axis 1)": the layer is converted from (q − zp)·scale.
    dequantised: str | None = None
    weight_itemsize: int = 4      # bytes per weight in the input file


def match_linear(graph: gs.Graph, node: gs.Node) -> LinearMatch | str:
    """Pattern and check: the linear layer rooted at a MatMul or Gemm, or why it is not one."""
    opset = graph_opset(graph)
    x, w_tensor = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant):
        return "activation input is constant (fold the graph instead)"
    try:
        w = constant_value(w_tensor, opset)
    except NotConstant as err:
        return f"no constant weight: the second input is an activation ({err}), e.g. attention scores"
    if w.ndim != 2:
        return f"weight has rank {w.ndim}, not 2 (batched MatMul)"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not floating point"
    x_dtype = tensor_dtype(x)
    if x_dtype is not None and x_dtype != np.float32:
        return f"activation dtype {np.dtype(x_dtype).name}; ShiftLinear takes float32"
    bias = None
    nodes = [node]
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA=1"
        w = w.T if node.attrs.get("transB", 0) else w
        w = w * float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            try:
                c = constant_value(node.inputs[2], opset)
            except NotConstant as err:
                return f"Gemm bias C is not constant: {err}"
            c = np.asarray(c, dtype=np.float64) * float(node.attrs.get("beta", 1.0))
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return f"Gemm bias C has shape {list(c.shape)}, not per output channel"
            bias = np.broadcast_to(c.reshape(-1), (w.shape[1],))
    output = node.outputs[0]
    if bias is None:
        bias, add = _bias_add(graph, output, w.shape[1], opset)
        if add is not None:
            nodes.append(add)
            output = add.outputs[0]
    # A large weight stays a transposed view (rounding reads it a few rows at a time): a
    # contiguous copy of a 2 GiB weight would double the memory the conversion needs.
    stored = dequantised_from(w_tensor)
    return LinearMatch(nodes, x, w.T if w.size > CHUNK_ELEMENTS else np.ascontiguousarray(w.T), bias, output,
                       *(stored or (None, 4)))


def _bias_add(graph: gs.Graph, y: gs.Tensor, out_features: int, opset: int):
    """(bias, Add node) when y's only consumer adds a constant per-channel vector, else (None, None)."""
    add = sole_consumer(graph, y)
    if add is None or add.op != "Add":
        return None, None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    try:
        b = constant_value(other, opset)
    except NotConstant:
        return None, None
    if b.size != out_features or b.shape[-1] != out_features or any(d != 1 for d in b.shape[:-1]):
        return None, None
    y_rank = len(y.shape) if y.shape is not None else None
    if y_rank is not None and b.ndim > y_rank:
        return None, None   # the Add would broadcast the output to a higher rank
    return b.reshape(-1), add


# Weights are rounded this many elements at a time (whole rows), so that a layer of 2 GiB does not
# take several float64/int32 copies of itself at once.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(out_features: int, in_features: int, weight_bits: int, terms: int = 1) -> int:
    """Rows of a weight [out, in] to round at a time: all of them for a small weight or when the
    terms' code streams do not start on a byte, else a multiple of 8 near CHUNK_ELEMENTS."""
    if out_features * in_features <= CHUNK_ELEMENTS or (terms > 1 and out_features * in_features * weight_bits % 8):
        return max(out_features, 1)
    return max(8, CHUNK_ELEMENTS // in_features // 8 * 8)


def _rows(weight: np.ndarray, start: int, rows: int) -> torch.Tensor:
    """Rows of a weight as a tensor; rounding reads float32 values, so float32 stays float32."""
    part = weight[start:start + rows]
    return torch.from_numpy(np.asarray(part, dtype=np.float32 if part.dtype == np.float32 else np.float64))


def shift_linear_node(name: str, x: gs.Tensor, y: gs.Tensor, weight: np.ndarray,
                      bias: np.ndarray | None, cfg) -> tuple[gs.Node, int]:
    """The ShiftLinear node computing y from x with `weight` [out, in] rounded to codes in the
    format of `cfg` (weight_bits, act_bits, act_frac_bits, weight_scale, and terms where the
    config has them), and the bytes its constants take."""
    out_features, in_features = weight.shape
    terms = getattr(cfg, "terms", 1)
    rows = chunk_rows(out_features, in_features, cfg.weight_bits, terms)
    starts = range(0, out_features, rows) or [0]
    if not all(np.isfinite(weight[o:o + rows]).all() for o in starts):
        raise PassError(f"node '{name}': weight has NaN or Inf values")
    if bias is not None and not np.isfinite(bias).all():
        raise PassError(f"node '{name}': bias has NaN or Inf values")
    if cfg.weight_scale == "tensor" and rows < out_features:
        peak = max(float(np.abs(weight[o:o + rows].astype(np.float32)).max(initial=0.0)) for o in starts)
        exponent = pow2.channel_exponents(torch.tensor([[peak]]), "tensor").repeat(out_features)
    else:
        exponent = torch.cat([pow2.channel_exponents(_rows(weight, o, rows), cfg.weight_scale) for o in starts])
    bad = (exponent.to(torch.int32) - cfg.act_frac_bits)
    if bad.numel() and (bad.min() < -126 or bad.max() > 127):
        raise PassError(f"node '{name}': weight exponents with act_frac_bits={cfg.act_frac_bits} leave "
                        "the float32 range of the final rescale")
    # Codes [terms, out, in] packed flat, in chunks of whole rows: term t's codes of rows o… start
    # at bit (t·out·in + o·in)·B, on a byte when o is a multiple of 8 (chunk_rows).
    packed = np.zeros(-(-terms * out_features * in_features * cfg.weight_bits // 8), dtype=np.uint8)
    for o in starts:
        codes = pow2.round_to_term_codes(_rows(weight, o, rows), exponent[o:o + rows], cfg.weight_bits, terms)
        if rows >= out_features:
            packed = pow2.pack_codes(codes.numpy(), cfg.weight_bits)
            break
        for t in range(terms):
            part = pow2.pack_codes(codes[t].numpy(), cfg.weight_bits)
            start = (t * out_features + o) * in_features * cfg.weight_bits // 8
            packed[start:start + part.size] = part
    inputs = [x,
              gs.Constant(f"{name}.codes", packed),
              gs.Constant(f"{name}.exponent", exponent.numpy().astype(np.int8))]
    if bias is not None:
        inputs.append(gs.Constant(f"{name}.bias", np.asarray(bias, dtype=np.float32)))
    node = gs.Node(op="ShiftLinear", name=name, domain=DOMAIN, inputs=inputs, outputs=[y], attrs={
        "in_features": in_features, "out_features": out_features, "weight_bits": cfg.weight_bits,
        "act_bits": cfg.act_bits, "act_frac_bits": cfg.act_frac_bits, **({"terms": terms} if terms > 1 else {})})
    nbytes = sum(t.values.nbytes for t in inputs[1:])
    return node, nbytes


# --- Numeric range checks for the report (docs/ops.md#range-of-the-accumulator) ---------------

# Without --data and without a producer that bounds the input, a layer is flagged when inputs
# above this |x| can wrap its accumulator: trained networks' activations reach tens (MiniLM's
# GELU outputs 25 on our sentences, against a safe limit of 62 for its FFN output layers), so
# a lower limit is a real risk; the report states every layer's limit anyway.
UNBOUNDED_WARN_BELOW = 50.0
# The checks read weights and codes this many at a time (whole rows), so that a layer of any
# size costs a few copies of one chunk.
CHECK_ELEMENTS = 1 << 22
# Tiny non-zero weights that became the zero code are reported above this fraction of a layer's
# non-zero weights (one outlier per row, or a coarse --weight-bits, zeroes the rest).
FLUSHED_WARN_FRACTION = 0.10
# Ops whose output magnitude is bounded whatever their input; the others listed pass their first
# input's bound through (they move, select or shrink elements).
_BOUNDED = {"Softmax": 1.0, "Sigmoid": 1.0, "HardSigmoid": 1.0, "Tanh": 1.0, "Softsign": 1.0, "Erf": 1.0}
_PASS_THROUGH = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Compress",
                 "Gather", "Slice", "Split", "Expand", "Relu")


def exclude_hint(name: str) -> str:
    """An --exclude pattern that matches exactly this node."""
    return f"--exclude '^{re.escape(name)}$'"


def weight_warnings(name: str, weight: np.ndarray, exponent: np.ndarray | None, cfg) -> list[str]:
    """Report lines for float weights [out, in] that the format could not hold with the channel
    exponents chosen (None: those of cfg.weight_scale): clamped to the channel's largest code, or
    (a large share) flushed to zero. Counted in chunks of rows, like the rounding. `name`: what
    --exclude should name."""
    out_features, in_features = weight.shape
    if exponent is None:
        exponent = pow2.channel_exponents(torch.from_numpy(np.asarray(weight, dtype=np.float64)),
                                          cfg.weight_scale).numpy()
    rows = max(1, CHECK_ELEMENTS // max(in_features, 1))
    e = np.asarray(exponent, dtype=np.int32)
    clamped = flushed = nonzero = 0
    peak = 0.0
    for o in range(0, out_features, rows):
        c, f, n = pow2.weight_range_counts(weight[o:o + rows], e[o:o + rows], cfg.weight_bits)
        clamped, flushed, nonzero = clamped + c, flushed + f, nonzero + n
        peak = max(peak, float(np.abs(weight[o:o + rows]).max(initial=0.0)))
    lines = []
    if clamped:
        top = int(e.max())
        if cfg.weight_scale != "none":   # the exponent reached its limit
            why = f"beyond the largest code 2^{top} (channel exponents stop at ±{pow2.EXPONENT_LIMIT})"
            fix = exclude_hint(name) + " keeps the layer float"
        else:
            why = "above their channel's largest code (--weight-scale none)"
            fix = f"--weight-scale channel, or {exclude_hint(name)} to keep the layer float"
        lines.append(f"{clamped} of {weight.size} weights lie {why} and were clamped to it "
                     f"(max |w| = {peak:.3g}); fix: {fix}")
    if nonzero and flushed > FLUSHED_WARN_FRACTION * nonzero:
        lines.append(f"{flushed} of {nonzero} non-zero weights ({100 * flushed / nonzero:.0f} %) are below half "
                     f"their channel's smallest code 2^(e-{pow2.zero_shift(cfg.weight_bits)}) and became 0; "
                     f"fix: a larger --weight-bits, --shift-terms 2, or {exclude_hint(name)}")
    return lines


@dataclass
class AccumulatorCheck:
    """The range of one ShiftLinear node's int32 accumulator: the largest |x| on every input that
    cannot wrap it, and what the inputs are known to reach (from --data or their producer)."""
    node: str
    safe_abs_input: float                  # inf: even saturated inputs cannot wrap it
    input_bound: float | None = None       # max |x| the inputs are known (or seen) to reach
    bound_source: str = ""                 # "calibration data" or the bounding producer
    worst: int | None = None               # the largest row bound at input_bound, in acc units
    warning: str | None = None


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _constant(model, inits, name: str) -> np.ndarray | None:
    if name in inits:
        try:
            return onnx.numpy_helper.to_array(inits[name])
        except Exception:   # external data not loaded, unreadable: no value
            return None
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
    return None


def _upstream(model: onnx.ModelProto, tensor: str) -> list[tuple[str, onnx.NodeProto | None]]:
    """`tensor` and the tensors it comes from through pass-through ops, each with its producer."""
    producers = {o: n for n in model.graph.node for o in n.output}
    chain = []
    while True:
        node = producers.get(tensor)
        chain.append((tensor, node))
        if node is None or node.op_type not in _PASS_THROUGH or not node.input or len(chain) > 64:
            return chain
        tensor = node.input[0]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _rank(model: onnx.ModelProto, tensor: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


# LayerNormalization's bounds hold for exact arithmetic; ORT's float32 result may exceed them by
# a few ulps.
_LN_MARGIN = 1 + 2 ** -12


def known_input_bound(model: onnx.ModelProto, tensor: str, width: int):
    """(bound, label, ln) for `tensor` from the op that produces it (through pass-through ops), or
    None: `bound` [width] bounds |x| per column — 1 for Softmax/Sigmoid/Tanh-like ops,
    max(|lo|, |hi|) for a Clip with both bounds constant, √(n−1)·|γ| + |β| for
    LayerNormalization over its last axis of n elements (|x̂| ≤ √(n−1) as Σx̂ = 0, Σx̂² ≤ n);
    `ln` = (|γ|, |β|, n) per column when the LayerNorm feeds the layer directly, for the tighter
    row bound Σ|x_i|·u_i ≤ √n·‖γ ⊙ u‖₂ + Σ|β_i|·u_i (Cauchy–Schwarz on ‖x̂‖₂ ≤ √n)."""
    inits = _initializers(model)
    for through, (_, node) in enumerate(_upstream(model, tensor)):
        if node is None or (node.domain or "") not in ("", "ai.onnx"):
            return None
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        if node.op_type in _BOUNDED:
            return np.full(width, _BOUNDED[node.op_type]), label, None
        if node.op_type == "Clip":
            lo, hi = _attr(node, "min"), _attr(node, "max")   # opset < 11: attributes
            if len(node.input) > 1 and node.input[1]:
                lo = _constant(model, inits, node.input[1])
            if len(node.input) > 2 and node.input[2]:
                hi = _constant(model, inits, node.input[2])
            if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:
                return None
            return np.full(width, max(abs(float(np.ravel(lo)[0])), abs(float(np.ravel(hi)[0])))), label, None
        if node.op_type == "LayerNormalization":
            axis, rank = _attr(node, "axis", -1), _rank(model, node.input[0])
            scale = _constant(model, inits, node.input[1]) if len(node.input) > 1 else None
            bias = _constant(model, inits, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
            if scale is None or bias is None or not (axis == -1 or (rank is not None and axis == rank - 1)):
                return None
            # n: the normalised axis, the linear's width when nothing lies between, else the Scale's
            n = width if through == 0 else (scale.size if scale.size > 1 else None)
            if n is None or scale.size not in (1, n) or bias.size not in (1, n):
                return None
            gamma = np.broadcast_to(np.abs(scale.reshape(-1).astype(np.float64)), (n,))
            beta = np.broadcast_to(np.abs(bias.reshape(-1).astype(np.float64)), (n,))
            bound = (np.sqrt(n - 1) * gamma + beta) * _LN_MARGIN
            if through:
                return np.full(width, float(np.max(bound))), label, None
            return bound, label, (gamma * _LN_MARGIN, beta * _LN_MARGIN, n)
    return None


def _seen_range(model: onnx.ModelProto, tensor: str, width: int, input_ranges: dict) -> np.ndarray | None:
    """max |x| per column [width] of `tensor` from calibration ranges, keyed by it or by a tensor it
    comes from through pass-through ops (then the largest figure for every column)."""
    for depth, (name, _) in enumerate(_upstream(model, tensor)):
        if name in input_ranges:
            r = np.asarray(input_ranges[name], dtype=np.float64).reshape(-1)
            if depth or r.size != width:
                r = np.full(width, r.max(initial=0.0))
            return r
    return None


class _Codes:
    """The shifts of a ShiftLinear node's packed codes, read in chunks of whole rows (a layer of
    any size costs a few bytes per weight of one chunk at a time)."""

    def __init__(self, packed: np.ndarray, terms: int, n_out: int, n_in: int, bits: int):
        self.packed, self.terms, self.n_out, self.n_in, self.bits = packed, terms, n_out, n_in, bits
        self.rows = max(1, CHECK_ELEMENTS // max(n_in * terms, 1))
        self._whole = None   # the one chunk of a layer that fits in one, read once

    def chunks(self):
        """shifts [terms, r, in] (−1 for a zero code) of rows o … o + r, for each chunk."""
        if self.rows >= self.n_out:
            if self._whole is None:
                self._whole = next(self._read())
            yield self._whole
        else:
            yield from self._read()

    def _read(self):
        n, b = self.n_in, self.bits
        for o in range(0, self.n_out, self.rows):
            r = min(self.rows, self.n_out - o)
            parts = []
            for t in range(self.terms):
                start = ((t * self.n_out + o) * n) * b
                stream = np.unpackbits(self.packed[start // 8:-(-(start + r * n * b) // 8)], bitorder="little")
                bits = stream[start % 8:start % 8 + r * n * b].reshape(r * n, b)
                codes = np.packbits(bits, axis=1, bitorder="little").reshape(-1)   # B ≤ 8 bits → one byte
                parts.append(pow2.code_shifts(codes, b).reshape(r, n))
            yield np.stack(parts)

    def bound(self, x_max_q: np.ndarray) -> np.ndarray:
        """Per row, the largest |acc| inputs with |x_q| ≤ x_max_q can give (pow2.accumulator_bound)."""
        return np.concatenate([pow2.accumulator_bound(s, x_max_q) for s in self.chunks()])

    def norm_bound(self, gamma: np.ndarray, beta: np.ndarray, n: int, frac_bits: int) -> np.ndarray:
        """Per row, a bound on |acc| for LayerNorm outputs y = γ ⊙ x̂ + β (‖x̂‖₂ ≤ √n) in
        Q·.frac_bits: with u_i = Σ_t 2^−m_ti, Σ ceil(|x_q,i| / 2^m) ≤ 2^F · Σ|y_i|·u_i + S_o + n_o
        and Σ|y_i|·u_i ≤ √n·‖γ ⊙ u‖₂ + Σ β_i·u_i (γ, β ≥ 0 here)."""
        rows = []
        for shifts in self.chunks():
            nonzero = shifts >= 0
            u = np.where(nonzero, np.exp2(-np.maximum(shifts, 0).astype(np.float64)), 0.0).sum(axis=0)
            y = np.sqrt(n) * np.sqrt(((gamma * u) ** 2).sum(axis=1)) + (beta * u).sum(axis=1)
            rows.append(np.ceil(2.0 ** frac_bits * y + u.sum(axis=1) + nonzero.sum(axis=(0, 2))))
        return np.minimum(np.concatenate(rows), 2.0 ** 62).astype(np.int64)

    def magnitudes(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [pow2.row_magnitudes(s) for s in self.chunks()]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def accumulator_checks(model: onnx.ModelProto, input_ranges: dict[str, np.ndarray] | None = None,
                       producers_of: onnx.ModelProto | None = None) -> list[AccumulatorCheck]:
    """Check every ShiftLinear node's int32 accumulator for wrap-around (docs/ops.md). With
    `input_ranges` (max |x| per input column, or one figure, from calibration data, keyed by the
    node's input tensor) a node warns when those inputs can wrap it; else, when its input comes
    from a bounding op, when that bound can; else when the safe |x| is below
    UNBOUNDED_WARN_BELOW. `producers_of`: the model to look for bounding producers in (default
    `model`)."""
    inits = _initializers(model)
    checks = []
    for node in model.graph.node:
        if node.op_type != "ShiftLinear" or node.domain != DOMAIN:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n_in, n_out = attrs.get("in_features"), attrs.get("out_features")
        bits, terms = attrs.get("weight_bits", 5), attrs.get("terms", 1)
        a_bits, f_bits = attrs.get("act_bits", 32), attrs.get("act_frac_bits", 16)
        if not (all(isinstance(v, int) for v in (n_in, n_out, bits, terms, a_bits, f_bits)) and n_in >= 1
                and n_out >= 1 and 2 <= bits <= 5 and 1 <= terms <= 4 and 2 <= a_bits <= 32 and -32 <= f_bits <= 32
                and len(node.input) > 1):
            continue   # not one this conversion wrote (the kernel refuses a malformed one)
        packed = _constant(model, inits, node.input[1])
        if packed is None or packed.dtype != np.uint8 or packed.size * 8 < terms * n_out * n_in * bits:
            continue   # not readable here (or malformed, which the kernel refuses)
        codes = _Codes(packed.reshape(-1), terms, n_out, n_in, bits)
        name = node.name or node.output[0]
        saturated = codes.bound(np.full(n_in, 2 ** (a_bits - 1), dtype=np.int64)).max(initial=0)
        s, n = codes.magnitudes() if saturated > pow2.ACC_MAX else (None, None)
        check = AccumulatorCheck(name, pow2.safe_input_bound(int(saturated), s, n, f_bits))
        checks.append(check)
        if check.safe_abs_input == float("inf"):
            continue
        x = node.input[0]
        seen = None if input_ranges is None else _seen_range(producers_of or model, x, n_in, input_ranges)
        known = known_input_bound(producers_of or model, x, n_in)
        narrower = ("--act-bits 16 with --data to calibrate it per layer" if a_bits == 32
                    else f"a smaller --act-bits (now {a_bits})")
        fix = (f"lower --act-frac-bits (now {f_bits}), or {narrower}, or {exclude_hint(name)} to keep "
               "the layer float")
        if known is not None:
            bound, source, ln = known
            worst = codes.bound(pow2.max_abs_fixed(bound, a_bits, f_bits))
            if ln is not None:
                worst = np.minimum(worst, codes.norm_bound(*ln, f_bits))
            check.input_bound, check.bound_source, check.worst = float(bound.max()), source, int(worst.max())
            if worst.max() <= pow2.ACC_MAX:
                continue   # proved safe for anything the producer can give
        if seen is not None:
            worst = codes.bound(pow2.max_abs_fixed(seen, a_bits, f_bits))
            check.input_bound, check.bound_source, check.worst = float(seen.max()), "calibration data", int(worst.max())
            if worst.max() > pow2.ACC_MAX:
                frac = _fitting_frac_bits(codes, seen, a_bits, f_bits)
                rows = int((worst > pow2.ACC_MAX).sum())
                check.warning = (
                    f"int32 accumulator can wrap around on the calibration data: inputs up to |x| = "
                    f"{seen.max():.4g} give row {int(worst.argmax())} a sum of up to {worst.max():.4g} > 2^31 − 1 "
                    f"({rows} of {n_out} rows over; no wrap for |x| ≤ {check.safe_abs_input:.4g} at "
                    f"Q{a_bits - f_bits}.{f_bits}); fix: "
                    + (f"--act-frac-bits {frac} or lower, or " if frac is not None else "")
                    + f"{narrower}, or {exclude_hint(name)} to keep the layer float")
        elif known is not None:
            check.warning = (f"int32 accumulator can wrap around: its input comes from {check.bound_source} (|x| ≤ "
                             f"{check.input_bound:.4g}), which can give row {int(worst.argmax())} a sum of up to "
                             f"{worst.max():.4g} > 2^31 − 1; no wrap for |x| ≤ {check.safe_abs_input:.4g}; fix: {fix}")
        elif check.safe_abs_input < UNBOUNDED_WARN_BELOW:
            check.warning = (f"int32 accumulator wraps around for inputs beyond |x| = {check.safe_abs_input:.4g} "
                             f"(Q{a_bits - f_bits}.{f_bits}; a row's |w| sum is up to {s.max():.4g}× its channel "
                             f"scale) and the input range is unknown; fix: check it with --data, {fix}")
    return checks


def _fitting_frac_bits(codes: _Codes, seen, act_bits: int, frac_bits: int) -> int | None:
    """The largest F below `frac_bits` at which the seen inputs cannot wrap, None if none ≥ −32."""
    for f in range(frac_bits - 1, -33, -1):
        if codes.bound(pow2.max_abs_fixed(seen, act_bits, f)).max() <= pow2.ACC_MAX:
            return f
    return None


def annotate_accumulators(changes: list, checks: list[AccumulatorCheck]) -> None:
    """Put each check on the report's LayerChange of its node (a MoE expert's ShiftLinear, named
    under its block, on the block's entry): `accumulator` figures and the warning, replacing
    those of an earlier check (a re-check after re-rounding)."""
    by_name = {c.node: c for c in changes}
    for check in checks:
        change = by_name.get(check.node)
        warning = check.warning
        if change is None:
            owners = [c for c in changes if check.node.startswith(c.node + "/")]
            if not owners:
                continue   # a ShiftLinear that was already in the input model
            change = max(owners, key=lambda c: len(c.node))
            warning = warning and (f"ShiftLinear '{check.node}': "
                                   + warning.replace(exclude_hint(check.node), exclude_hint(change.node)))
        old = (change.accumulator or {}).get(check.node, {}).get("warning")
        if old in change.warnings:
            change.warnings.remove(old)
        safe = None if check.safe_abs_input == float("inf") else check.safe_abs_input
        change.accumulator = {**(change.accumulator or {}), check.node: {
            "safe_abs_input": safe, "input_bound": check.input_bound, "bound_source": check.bound_source,
            "worst_row_sum": check.worst, "warning": warning}}
        if warning:
            change.warnings.append(warning)
