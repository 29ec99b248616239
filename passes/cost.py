"""What a model costs per inference, before and after conversion: the operations each op really
performs (docs/ops.md's arithmetic), weight bytes, an energy estimate, and per layer the weight
SQNR of the rounded weights (docs/report.md defines every figure).

Counted: MatMul, Gemm, Conv, Softmax and BatchNormalization nodes of the main graph, and our
ops (ShiftLinear, AddLinearAttention, ShiftConv, AdderConv, SpatialShift's fused tail, the
ShiftMoEMLP blocks). Elementwise
ops (activations, normalisation, residual adds, reshapes) are the same before and after and are
not counted. A sum of n terms counts n additions (accumulation into a zeroed register, as the
kernels run it: the usual MAC count); a scaling by an exact power of two (the fixed-point
conversions, ShiftLinear's 2^(e−F)) counts as a shift.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from mfconvert.ort_ops import DOMAIN

# Energy per operation in pJ, 45 nm (docs/report.md#energy-model): Horowitz, "Computing's energy
# problem (and what we can do about it)", ISSCC 2014, for the float32 and int32 figures; the
# 32-bit shift from ShiftAddNet (You et al., NeurIPS 2020, Table 1, 45 nm). int64 adds (AdderConv's
# accumulator) are priced at twice an int32 add and absolute values as an int32 add (a conditional
# negation): our assumptions, not published figures. exp/sqrt have no figure and are not priced.
ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int32_add": 0.1, "int64_add": 0.2, "int_abs": 0.1,
             "shift": 0.13}
KINDS = ("fp32_mul", "fp32_add", "int32_add", "int64_add", "int_abs", "shift", "fp32_special")
COUNTED_FLOAT_OPS = ("MatMul", "Gemm", "Conv", "Softmax", "BatchNormalization")
OUR_OPS = ("ShiftLinear", "AddLinearAttention", "ShiftConv", "AdderConv", "SpatialShift")
DEFAULT_MOE_SHIFT_FRACTION = 0.5
EXACT_DB = 300.0   # the SQNR reported for weights the format holds exactly (JSON has no infinity)
ATTENTION_KEY_CHUNK = 256   # keys per partial sum of the AddLinearAttention kernel (add_attention_impl.h)


def ops(**counts) -> dict[str, float]:
    return {k: float(counts.get(k, 0)) for k in KINDS}


def add_ops(a: dict | None, b: dict | None, scale: float = 1.0) -> dict | None:
    """a + scale·b; None (unknown) if either is."""
    if a is None or b is None:
        return None
    return {k: a[k] + scale * b[k] for k in KINDS}


def energy_pj(counts: dict) -> float:
    return sum(counts[k] * ENERGY_PJ[k] for k in ENERGY_PJ)


def summary(counts: dict | None) -> dict | None:
    """The figures a reader compares: multiplications, additions (any width), shifts, absolute
    values, exp/sqrt, and the energy estimate in pJ; every count per inference."""
    if counts is None:
        return None
    return {"multiplications": round(counts["fp32_mul"]),
            "additions": round(counts["fp32_add"] + counts["int32_add"] + counts["int64_add"]),
            "shifts": round(counts["shift"]), "absolute_values": round(counts["int_abs"]),
            "exp_sqrt": round(counts["fp32_special"]),
            "by_kind": {k: round(v) for k, v in counts.items()}, "energy_pj": energy_pj(counts)}


# --- shapes -----------------------------------------------------------------------------------
def tensor_dims(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> tuple[dict[str, list[int]], str | None]:
    """Dims of every tensor of `model` at the input `shapes` whose dims are all known and ≥ 0
    (onnx's inference, then ORT's symbolic one for what it left open; initializers from their
    declared dims), and the reason when inference failed."""
    from mfconvert.convert.canonicalize import canonical_shapes, fixed_copy

    dims: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    why = None
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed_copy(model, shapes), data_prop=True)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            d = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape") and all(x.HasField("dim_value") and x.dim_value >= 0 for x in d):
                dims[vi.name] = [x.dim_value for x in d]
    except Exception as err:   # the counts are optional: say why they are missing
        why = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    wanted = {t for n in model.graph.node if n.op_type in COUNTED_FLOAT_OPS + OUR_OPS for t in list(n.input) + list(n.output)}
    if wanted - dims.keys():
        try:
            for name, d in canonical_shapes(model, shapes).items():
                if name not in dims and d and all(isinstance(v, int) and v >= 0 for v in d):
                    dims[name] = d
            why = None
        except RuntimeError as err:
            why = why or str(err)
    return dims, why


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _given(node: onnx.NodeProto, i: int) -> bool:
    return len(node.input) > i and bool(node.input[i])


def _rows(d: list[int]) -> int:
    return math.prod(d[:-1])


# --- float ops ----------------------------------------------------------------------------------
def float_node_ops(node: onnx.NodeProto, dims: dict) -> dict | None:
    """What a float MatMul/Gemm/Conv/Softmax/BatchNormalization node performs; None when its
    shapes are unknown."""
    a = dims.get(node.input[0]) if node.input else None
    y = dims.get(node.output[0]) if node.output else None
    at = node_attrs(node)
    if node.op_type == "MatMul":
        if a is None or y is None or not a:
            return None
        n, k = math.prod(y), a[-1]
        return ops(fp32_mul=n * k, fp32_add=n * k)
    if node.op_type == "Gemm":
        if a is None or y is None or len(a) != 2:
            return None
        n, k = math.prod(y), a[0] if at.get("transA", 0) else a[1]
        bias = _given(node, 2)
        extra = (n if at.get("alpha", 1.0) != 1.0 else 0) + (n if bias and at.get("beta", 1.0) != 1.0 else 0)
        return ops(fp32_mul=n * k + extra, fp32_add=n * k + (n if bias else 0))
    if node.op_type == "Conv":
        w = dims.get(node.input[1])
        if y is None or w is None:
            return None
        n, k = math.prod(y), math.prod(w[1:])
        return ops(fp32_mul=n * k, fp32_add=n * k + (n if _given(node, 2) else 0))
    if node.op_type == "Softmax":
        if a is None:
            return None
        n = math.prod(a)   # per element: − max, exp, + into the sum, ÷ the sum
        return ops(fp32_add=2 * n, fp32_mul=n, fp32_special=n)
    if node.op_type == "BatchNormalization":
        if y is None:
            return None
        n = math.prod(y)   # inference: one scale and one shift per element
        return ops(fp32_mul=n, fp32_add=n)
    return None


# --- our ops ------------------------------------------------------------------------------------
def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """{name: tensor} of the model's initializers and Constant nodes' values."""
    found = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            found.setdefault(n.output[0], n.attribute[0].t)
    return found


def constant_array(inits: dict, name: str) -> np.ndarray | None:
    """The value of constant `name` in `inits` (initializers()), or None: absent, left on disk, or
    unreadable."""
    t = inits.get(name)
    if t is None or (t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data):
        return None   # a tensor left on disk: not read for a report figure
    try:
        return numpy_helper.to_array(t)
    except Exception:
        return None


CHUNK_CODES = 1 << 22   # codes read at a time (a multiple of 8: whole bytes for any width)


def read_codes(packed: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Codes [start, start + count) of a bit-packed stream (docs/ops.md#weight-codes: LSB first):
    8 codes are B whole bytes, read as one little-endian integer."""
    a, b = start // 8, -(-(start + count) // 8)          # groups of 8 codes
    raw = packed[a * bits:b * bits]
    if raw.size < (b - a) * bits:   # the last group's unused bits are not stored
        raw = np.concatenate([raw, np.zeros((b - a) * bits - raw.size, dtype=np.uint8)])
    groups = raw.reshape(-1, bits).astype(np.uint64)
    value = np.zeros(len(groups), dtype=np.uint64)
    for j in range(bits):
        value |= groups[:, j] << np.uint64(8 * j)
    mask = np.uint64((1 << bits) - 1)
    codes = np.stack([(value >> np.uint64(bits * k)) & mask for k in range(8)], axis=1).astype(np.uint8).reshape(-1)
    return codes[start - 8 * a:start - 8 * a + count]


def nonzero_codes(packed: np.ndarray, bits: int, count: int) -> int:
    """How many of the first `count` codes are not the zero code (shift field all ones)."""
    zero = (1 << (bits - 1)) - 1
    total = 0
    for start in range(0, count, CHUNK_CODES):
        c = read_codes(packed, bits, start, min(CHUNK_CODES, count - start))
        total += int(np.count_nonzero((c & zero) != zero))
    return total


def _codes_input(node: onnx.NodeProto, inits: dict, count: int, bits: int) -> np.ndarray | None:
    packed = constant_array(inits, node.input[1]) if _given(node, 1) else None
    if packed is None or packed.dtype != np.uint8 or packed.size * 8 < count * bits:
        return None
    return packed.reshape(-1)


def shift_linear_ops(node: onnx.NodeProto, dims: dict, inits: dict, rows: float | None = None) -> dict | None:
    """ShiftLinear (docs/ops.md#arithmetic), per row: `in` quantisations (x·2^F, a shift), one
    shift and one int32 addition per non-zero code over all terms, and per output one rescale by
    2^(e−F) (a shift) and, with a bias, one float addition."""
    at = node_attrs(node)
    n_in, n_out, bits, terms = at.get("in_features"), at.get("out_features"), at.get("weight_bits", 5), at.get("terms", 1)
    if rows is None:
        d = dims.get(node.input[0]) or dims.get(node.output[0])
        rows = _rows(d) if d else None
    packed = _codes_input(node, inits, terms * n_out * n_in, bits)
    if rows is None or packed is None:
        return None
    nnz = nonzero_codes(packed, bits, terms * n_out * n_in)
    return ops(shift=rows * (n_in + nnz + n_out), int32_add=rows * nnz,
               fp32_add=rows * n_out if _given(node, 3) else 0)


def attention_ops(node: onnx.NodeProto, dims: dict, inits: dict) -> dict | None:
    """AddLinearAttention as its kernel runs (add_attention_impl.h), per batch item and head:
    S adds a V row (D floats) per set key bit and the key chunks' partial S together; U adds an
    S row per set query bit; then per token Z = 0.5·V + U/π (2D multiplies, D adds), ‖Z‖ (D
    multiplies and adds, one sqrt) and Z/‖Z‖ (D divisions, counted as multiplications). The
    set bits depend on the data: counted at half the code bits (sign codes at τ = 0 of
    zero-mean inputs). `sign` with thresholds normalises Q and K first; `ksh` hashes Q."""
    at = node_attrs(node)
    q = dims.get(node.input[0]) or dims.get(node.output[0])
    heads = at.get("num_heads")
    if q is None or len(q) != 3 or not heads:
        return None
    b, t, c = q
    d = c // heads
    tokens = b * t * heads   # (batch, token, head) triples
    binarizer = at.get("binarizer", "sign")
    counts = ops()
    if binarizer == "ksh":
        proj, anchors = dims.get(node.input[9]) if _given(node, 9) else None, dims.get(node.input[7]) if _given(node, 7) else None
        if proj is None or anchors is None:
            return None
        bits, m = proj[1], anchors[1]
        counts = add_ops(counts, ops(fp32_mul=tokens * (2 * d + m * d + m + bits * m),
                                     fp32_add=tokens * (d + 2 * m * d + m + bits * m),
                                     fp32_special=tokens * (1 + m)))
    else:
        bits = d
        normalised = (1 if _given(node, 5) else 0) + (1 if _given(node, 6) and _given(node, 1) else 0)
        if _given(node, 5) and not _given(node, 1):
            normalised = 1
        counts = add_ops(counts, ops(fp32_mul=normalised * tokens * 2 * d, fp32_add=normalised * tokens * d,
                                     fp32_special=normalised * tokens))
    chunks = max(1, -(-t // ATTENTION_KEY_CHUNK))
    set_bits = bits / 2
    gathered = tokens * set_bits * d * 2 + b * heads * (chunks - 1) * bits * d   # S and U, chunk sums
    counts = add_ops(counts, ops(fp32_add=gathered + tokens * d * 2, fp32_mul=tokens * d * 4, fp32_special=tokens))
    if _given(node, 4):
        w = dims.get(node.input[4])
        if w is None:
            return None
        taps = math.prod(w[1:])
        counts = add_ops(counts, ops(fp32_mul=tokens * d * taps, fp32_add=tokens * d * taps))
    return counts


def conv_output_dims(x: list[int], at: dict) -> list[int] | None:
    """ONNX Conv's output spatial dims for input [N, C, spatial…] (explicit pads)."""
    k = list(at.get("kernel_shape") or [])
    n = len(x) - 2
    if len(k) != n:
        return None
    s = list(at.get("strides") or [1] * n)
    dl = list(at.get("dilations") or [1] * n)
    p = list(at.get("pads") or [0] * (2 * n))
    out = [(x[2 + i] + p[i] + p[n + i] - dl[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n)]
    return out if all(v >= 0 for v in out) else None


def _fused_activation(at: dict, n: int) -> dict:
    """The fused activations (docs/ops.md#fused-activation-shiftconv-and-adderconv: none, Relu,
    Clip) compare and select: nothing counted."""
    return ops()


def shift_conv_ops(node: onnx.NodeProto, dims: dict, inits: dict) -> dict | None:
    """ShiftConv: ShiftLinear's arithmetic per output element over the im2col row of its group
    (padded taps included, as the definition sums them): one shift and one int32 addition per
    non-zero code of its output channel over all terms; x·2^F per input element; per output one
    rescale (shift), the bias add and the fused activation."""
    at = node_attrs(node)
    x = dims.get(node.input[0])
    m, bits, terms, group = at.get("out_channels"), at.get("weight_bits", 5), at.get("terms", 1), at.get("group", 1)
    if x is None or not m or len(x) < 3:
        return None
    tail = ops()
    if _given(node, 4):   # an input shift read through (docs/ops.md#input-shift-read-through): the conv's
        if len(x) != 4:   # input is the shifted X, and the shift's tail (scale, bias) is this node's work
            return None
        sh, sw = at.get("shift_strides", [1, 1])
        x = [x[0], x[1], -(-x[2] // sh), -(-x[3] // sw)]
        n_in = math.prod(x)
        tail = ops(fp32_mul=n_in if _given(node, 5) else 0, fp32_add=n_in if _given(node, 6) else 0)
    out = conv_output_dims(x, at)
    if out is None:
        return None
    count = terms * m * (x[1] // group) * math.prod(at.get("kernel_shape"))
    packed = _codes_input(node, inits, count, bits)
    if packed is None:
        return None
    positions = x[0] * math.prod(out)            # output positions per channel
    nnz = nonzero_codes(packed, bits, count)     # summed over channels: each channel's row once per position
    n_out = positions * m
    return add_ops(add_ops(ops(shift=math.prod(x) + positions * nnz + n_out, int32_add=positions * nnz,
                               fp32_add=n_out if _given(node, 3) else 0), _fused_activation(at, n_out)), tail)


def adder_conv_ops(node: onnx.NodeProto, dims: dict, inits: dict) -> dict | None:
    """AdderConv: per output element and tap of its group, x_q − w_q (an int32 subtraction), its
    absolute value and an int64 addition; x·2^F per input element (W is quantised once per
    session: not counted); per output the rescale by −2^−F (a shift), bias and activation."""
    at = node_attrs(node)
    x, w = dims.get(node.input[0]), dims.get(node.input[1])
    if x is None or w is None or len(x) < 3:
        return None
    out = conv_output_dims(x, at)
    if out is None:
        return None
    n_out = x[0] * w[0] * math.prod(out)
    taps = math.prod(w[1:])
    return add_ops(ops(int32_add=n_out * taps, int_abs=n_out * taps, int64_add=n_out * taps,
                       shift=math.prod(x) + n_out, fp32_add=n_out if _given(node, 2) else 0),
                   _fused_activation(at, n_out))


def spatial_shift_ops(node: onnx.NodeProto, dims: dict, inits: dict) -> dict | None:
    """SpatialShift: the move performs nothing; its fused tail (docs/ops.md#spatialshift) one
    multiplication per output element with a scale and one addition with a bias (the clamp
    compares: not counted)."""
    x = dims.get(node.input[0])
    if x is None or len(x) != 4:
        return None
    sh, sw = node_attrs(node).get("strides", [1, 1])
    n_out = x[0] * x[1] * -(-x[2] // sh) * -(-x[3] // sw)
    return ops(fp32_mul=n_out if _given(node, 2) else 0, fp32_add=n_out if _given(node, 3) else 0)


def node_ops(node: onnx.NodeProto, dims: dict, inits: dict, memo: dict | None = None) -> dict | None:
    """What `node` performs (None: unknown or not counted); `memo` keeps the figures of nodes
    already counted (reading a layer's codes twice costs time)."""
    if memo is not None:
        if id(node) not in memo:
            memo[id(node)] = node_ops(node, dims, inits)
        return memo[id(node)]
    if node.domain == DOMAIN:
        fn = {"ShiftLinear": shift_linear_ops, "AddLinearAttention": attention_ops,
              "ShiftConv": shift_conv_ops, "AdderConv": adder_conv_ops, "SpatialShift": spatial_shift_ops}.get(node.op_type)
        return fn(node, dims, inits) if fn else None
    return float_node_ops(node, dims)


def counted(node: onnx.NodeProto) -> bool:
    return (node.domain == DOMAIN and node.op_type in OUR_OPS) or (
        node.domain in ("", "ai.onnx") and node.op_type in COUNTED_FLOAT_OPS)


# --- MoE blocks ---------------------------------------------------------------------------------
def moe_blocks(model: onnx.ModelProto) -> list[str]:
    from mfconvert.passes.moe_mlp import ROUTES_KEY
    import json
    return list(json.loads({p.key: p.value for p in model.metadata_props}.get(ROUTES_KEY, "{}")))


def moe_ops(block: str, part: str, by_name: dict, dims: dict, inits: dict, shift_fraction: float) -> dict | None:
    """One part of a ShiftMoEMLP block (docs/ops.md#shiftmoemlp) at `shift_fraction` of its R
    tokens routed to Shift: 'router' (the [2, d] Gemm, the 2-way softmax and the gate product),
    'fc1' or 'fc2' (the Mult expert's Gemm on the other tokens plus the Shift expert's ShiftLinear)."""
    p = f"{block}/moe/"
    reshape = by_name.get(p + "tokens")
    x = dims.get(reshape.input[0]) if reshape is not None else None
    if x is None:
        return None
    r = _rows(x)
    if part == "router":
        router, gated = by_name.get(p + "router"), by_name.get(p + "output")
        y = dims.get(gated.output[0]) if gated is not None else None
        if router is None or y is None:
            return None
        d = x[-1]
        return ops(fp32_mul=r * 2 * d + 2 * r + r * y[-1], fp32_add=r * 2 * d + 2 * r + 4 * r, fp32_special=2 * r)
    gemm, shift = by_name.get(p + f"mult.{part}"), by_name.get(p + f"shift.{part}")
    if gemm is None or shift is None:
        return None
    w = dims.get(gemm.input[1])
    if w is None:
        return None
    out_f, in_f = w
    rm = r * (1 - shift_fraction)
    mult = ops(fp32_mul=rm * out_f * in_f, fp32_add=rm * out_f * in_f + (rm * out_f if _given(gemm, 2) else 0))
    return add_ops(mult, shift_linear_ops(shift, dims, inits, rows=r * shift_fraction))


# --- weight SQNR ----------------------------------------------------------------------------------
def code_sqnr_db(weight: np.ndarray, packed: np.ndarray, exponent: np.ndarray, bits: int, terms: int) -> float | None:
    """10·log10(Σw² / Σ(w − ŵ)²) of float weights [out, in] against the values their codes
    stand for (Σ over terms of ±2^(e_o − m), or 0), read a chunk of rows at a time."""
    n_out, n_in = weight.shape
    zero = (1 << (bits - 1)) - 1
    signal = noise = 0.0
    step = max(1, CHUNK_CODES // max(n_in * terms, 1))
    for o in range(0, n_out, step):
        r = min(step, n_out - o)
        value = np.zeros((r, n_in), dtype=np.float64)
        e = exponent[o:o + r].astype(np.int64)[:, None]
        for t in range(terms):
            c = read_codes(packed, bits, (t * n_out + o) * n_in, r * n_in).reshape(r, n_in).astype(np.int64)
            m = c & zero
            v = np.where(m == zero, 0.0, np.ldexp(1.0, e - np.where(m == zero, 0, m)))
            value += np.where(c >> (bits - 1) == 1, -v, v)
        w = weight[o:o + r].astype(np.float64)
        signal += float((w * w).sum())
        noise += float(((w - value) ** 2).sum())
    if signal == 0.0:
        return None
    return EXACT_DB if noise == 0.0 else min(EXACT_DB, 10.0 * math.log10(signal / noise))


def _linear_weight(node: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    """The float weight [out, in] of an original MatMul/Gemm whose weight is a constant."""
    if len(node.input) < 2:
        return None
    w = constant_array(inits, node.input[1])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    transposed = node.op_type == "Gemm" and node_attrs(node).get("transB", 0)
    return w if transposed else w.T


def layer_sqnr(change, new_nodes: list, orig_node, orig_inits: dict, inits: dict, by_name: dict,
               folded: dict | None = None) -> float | None:
    """Weight SQNR of a converted layer: its shift codes against the original float weights
    (ShiftLinear; ShiftConv against the conv's weights with what the pass folded in, `folded`;
    a MoE block's Shift expert against its Mult expert). None where the layer's weights are not
    a rounding of the original ones: attention (none), AdderConv (−Σ|x − w| is another function:
    only its output error says what it costs), ShiftAddNet's shift conv (A⁻¹W)."""
    if change.pass_name == "moe-mlp":
        block = change.target or change.node
        part = "fc1" if change.node == block else "fc2"
        shift = by_name.get(f"{block}/moe/shift.{part}")
        weight = constant_array(inits, f"{block}/moe/mult.{part}.weight")
        node = shift
    else:
        node = next((n for n in new_nodes if n.op_type in ("ShiftLinear", "ShiftConv")), None)
        weight = None
        if node is not None and orig_node is not None:
            if orig_node.op_type in ("MatMul", "Gemm"):
                weight = _linear_weight(orig_node, orig_inits)
            elif orig_node.op_type == "Conv" and node.op_type == "ShiftConv":
                weight = (folded or {}).get(node.name)
    if node is None or weight is None:
        return None
    at = node_attrs(node)
    bits, terms = at.get("weight_bits", 5), at.get("terms", 1)
    packed = _codes_input(node, inits, terms * weight.size, bits)
    exponent = constant_array(inits, node.input[2]) if _given(node, 2) else None
    if packed is None or exponent is None or exponent.size != weight.shape[0]:
        return None
    return code_sqnr_db(weight, packed, exponent, bits, terms)


# --- the whole model ------------------------------------------------------------------------------
def _label(node: onnx.NodeProto) -> str:
    """passes.graph.node_label for a NodeProto."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _attention_before(change, new_nodes: list, dims: dict) -> dict | None:
    """The softmax core it replaced: Q·Kᵀ and P·V (B·H·T·T·D multiplies and additions each) and
    the Softmax over B·H·T·T scores (scale and mask are elementwise: not counted)."""
    node = new_nodes[0] if new_nodes else None
    q = dims.get(node.output[0]) if node is not None else None
    heads = node_attrs(node).get("num_heads") if node is not None else None
    if q is None or len(q) != 3 or not heads:
        return None
    b, t, c = q
    scores = b * heads * t * t
    mm = 2 * b * t * t * c
    return ops(fp32_mul=mm + scores, fp32_add=mm + 2 * scores, fp32_special=scores)


def model_costs(original: onnx.ModelProto, converted: onnx.ModelProto, shapes: dict, changes: list,
                moe_shift_fraction: float | dict | None = None) -> dict:
    """Per layer (setting each change's `cost` and, where unset, `weight_sqnr_db`) and in total:
    operations before and after, energy, and notes on what is unknown or assumed."""
    notes: list[str] = []
    dims, why = tensor_dims(original, shapes)
    new_dims, _ = tensor_dims_converted(converted, dims)
    inits, orig_inits = initializers(converted), initializers(original)
    by_name = {n.name: n for n in converted.graph.node if n.name}
    orig_by_label = {_label(n): n for n in original.graph.node}
    consumers: dict[str, list] = {}
    for n in original.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    blocks = moe_blocks(converted)
    if isinstance(moe_shift_fraction, dict):
        split = {b: moe_shift_fraction.get(b, DEFAULT_MOE_SHIFT_FRACTION) for b in blocks}
        measured = all(b in moe_shift_fraction for b in blocks)
    else:
        split = {b: DEFAULT_MOE_SHIFT_FRACTION if moe_shift_fraction is None else moe_shift_fraction for b in blocks}
        measured = moe_shift_fraction is not None
    if blocks:
        notes.append("MoE blocks counted at " + ", ".join(f"{100 * split[b]:.0f} %" for b in blocks[:3])
                     + (" …" if len(blocks) > 3 else "") + " of tokens routed to the Shift expert"
                     + ("" if measured else " (assumed: an untrained router splits tokens about evenly; "
                        "mfconvert.moe.routing_split measures it)"))
    layer_names = {c.node for c in changes}
    folded = None   # ShiftConv weights with their folded BatchNormalization, read when first needed
    memo: dict = {}
    unknown: list[str] = []
    bias_adds = 0.0   # bias Adds fused into a converted MatMul: elementwise, but now part of its cost
    for c in changes:
        orig = orig_by_label.get(c.node)
        if c.pass_name == "moe-mlp":
            block = c.target or c.node
            part = "fc1" if c.node == block else "fc2"
            parts = [part] + (["router"] if part == "fc1" else [])
            after = ops()
            for p in parts:
                after = add_ops(after, moe_ops(block, p, by_name, new_dims, inits, split.get(block, DEFAULT_MOE_SHIFT_FRACTION)))
            new_nodes = []
        else:
            new_nodes = [n for n in converted.graph.node if counted(n) and _written_for(n.name, c.node, layer_names)
                         and (n.domain == DOMAIN or n.name not in orig_by_label)]
            after = ops() if new_nodes else None
            for n in new_nodes:
                after = add_ops(after, node_ops(n, new_dims, inits, memo))
            if not new_nodes and c.pass_name == "spatial-shift" and any(
                    n.op_type == "ShiftConv" and _given(n, 4) and _written_for(n.input[4], c.node, layer_names)
                    for n in converted.graph.node):
                after = ops()   # read through by the ShiftConv after it, which counts the shift's tail
        if c.pass_name == "add-attention":
            before = _attention_before(c, new_nodes, new_dims)
        elif orig is not None and counted(orig):
            before = float_node_ops(orig, dims)
            out = orig.output[0] if orig.output else ""
            follow = consumers.get(out, [])
            bias = [n for n in follow if n.op_type == "Add"]
            if orig.op_type == "MatMul" and bias and before is not None and not _still_there(bias[0], converted):
                before = add_ops(before, ops(fp32_add=math.prod(dims.get(out, [0]))))
                bias_adds += math.prod(dims.get(out, [0]))
            bn = [n for n in follow if n.op_type == "BatchNormalization" and len(follow) == 1]
            if bn and before is not None and not _still_there(bn[0], converted):   # folded or replaced
                before = add_ops(before, float_node_ops(bn[0], dims))
        else:
            before = None
        if before is None or after is None:
            unknown.append(c.node)
        if c.weight_sqnr_db is None:
            if folded is None and any(n.op_type == "ShiftConv" for n in new_nodes):
                folded = _conv_weights(converted, original)
            try:
                c.weight_sqnr_db = layer_sqnr(c, new_nodes, orig, orig_inits, inits, by_name, folded)
            except (ValueError, TypeError):
                c.weight_sqnr_db = None
        c.cost = {"before": summary(before), "after": summary(after)}
    # Totals: every counted node of each graph (MoE blocks as a whole).
    total_before = ops()
    open_before = []
    by_op_before: dict[str, dict] = {}
    by_op_after: dict[str, dict] = {}
    for n in original.graph.node:
        if counted(n):
            got = float_node_ops(n, dims)
            total_before = _plus(total_before, got, open_before, n)
            _tally(by_op_before, n.op_type, got)
    total_before["fp32_add"] += bias_adds
    _tally(by_op_before, "Add (bias, fused by a pass)", ops(fp32_add=bias_adds) if bias_adds else None)
    total_after = ops()
    open_after = []
    moe_prefixes = tuple(f"{b}/moe/" for b in blocks)
    for n in converted.graph.node:
        if counted(n) and not (moe_prefixes and n.name.startswith(moe_prefixes)):
            got = node_ops(n, new_dims, inits, memo)
            total_after = _plus(total_after, got, open_after, n)
            _tally(by_op_after, n.op_type, got)
    for b in blocks:
        for p in ("router", "fc1", "fc2"):
            got = moe_ops(b, p, by_name, new_dims, inits, split[b])
            if got is None:
                open_after.append(f"{b} ({p})")
            else:
                total_after = add_ops(total_after, got)
                _tally(by_op_after, "ShiftMoEMLP", got)
    if why and (unknown or open_before or open_after):
        notes.append(f"operation counts incomplete: shape inference at {shapes} failed: {why}")
    elif unknown:
        notes.append(f"operation counts unknown for {len(unknown)} layer(s) (first: {unknown[0]}): their shapes stay "
                     f"open at {shapes}; --input-shape sets dynamic dims")
    for label, missing in (("before", open_before), ("after", open_after)):
        if missing:
            notes.append(f"totals {label} leave out {len(missing)} node(s) of unknown shape (first: {missing[0]})")
    if any(a.type == onnx.AttributeProto.GRAPH or a.type == onnx.AttributeProto.GRAPHS
           for n in original.graph.node for a in n.attribute):
        notes.append("nodes inside subgraphs (If/Loop/Scan bodies) are not counted")
    before, after = summary(total_before), summary(total_after)
    return {
        "input_shapes": shapes,
        "units": {"counts": "operations per inference at input_shapes", "energy": "pJ per inference",
                  "bytes": "bytes", "weight_sqnr_db": "dB"},
        "energy_pj_per_op": dict(ENERGY_PJ),
        "energy_source": "45 nm: Horowitz, ISSCC 2014 (fp32, int32); shift: ShiftAddNet (NeurIPS 2020, "
                         "Table 1); int64 add = 2 × int32 add and |x| = int32 add assumed; exp/sqrt not priced",
        "before": before, "after": after,
        # the same totals by op type: what each kind of node costs, e.g. the float MatMuls left
        "by_op": {"before": {k: summary(v) for k, v in by_op_before.items()},
                  "after": {k: summary(v) for k, v in by_op_after.items()}},
        "weight_bytes": {"before": sum(c.bytes_before for c in changes), "after": sum(c.bytes_after for c in changes)},
        "notes": notes,
    }


def _written_for(name: str, layer: str, layers: set[str]) -> bool:
    """Whether a converted node named `name` was written for the layer labelled `layer`: its
    name is the label or extends it ('.add_attention', '/…'), and is not another layer's."""
    return bool(name) and (name == layer or (name.startswith((layer + ".", layer + "/")) and name not in layers))


def _conv_weights(converted: onnx.ModelProto, original: onnx.ModelProto) -> dict:
    """{ShiftConv node: the float weight [M, C/g·k] it was rounded from} (passes/conv.py)."""
    try:
        from mfconvert.passes.conv import conv_latent_weights
        return conv_latent_weights(converted, original)
    except Exception:   # a figure of the report: unknown rather than a failed conversion
        return {}


def _still_there(node: onnx.NodeProto, converted: onnx.ModelProto) -> bool:
    """Whether the converted graph keeps `node` (same op, name and inputs): a bias Add or a
    BatchNormalization a pass took into its layer is gone."""
    return any(n.op_type == node.op_type and n.name == node.name and list(n.input) == list(node.input)
               for n in converted.graph.node)


def _tally(table: dict, op: str, got: dict | None) -> None:
    if got is not None:
        table[op] = add_ops(table.get(op, ops()), got)


def _plus(total: dict, got: dict | None, missing: list, node) -> dict:
    if got is None:
        missing.append(_label(node))
        return total
    return add_ops(total, got)


def tensor_dims_converted(converted: onnx.ModelProto, dims: dict) -> tuple[dict, None]:
    """The converted graph's dims: the original's for the tensors it kept, plus its initializers
    (our ops' constants) and the inputs/outputs of copied nodes the original inference saw."""
    found = dict(dims)
    for i in converted.graph.initializer:
        found.setdefault(i.name, list(i.dims))
    for n in converted.graph.node:   # Constant nodes' values
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            found.setdefault(n.output[0], list(n.attribute[0].t.dims))
    return found, None
