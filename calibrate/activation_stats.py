"""Activation statistics that set the fixed-point format of each shift layer's input.

Q16.16 (32 bits) holds any activation a transformer produces; narrower formats (act_bits 8–16)
need a power-of-two scale per layer: the largest number of fractional bits F whose range
[−2^(A−1), 2^(A−1) − 1]·2^−F still holds the observed activations. The statistic is the maximum
|x| seen on the calibration data or, to ignore rare outliers, a percentile of |x|. Collected in
explicit phases: augment (the activations become graph outputs), collect (ORT runs over the
data), compute (one figure per tensor).
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from mfconvert.calibrate.data import Examples, chunks, model_fixed_batch
from mfconvert.runtime import session


def linear_inputs(model: onnx.ModelProto) -> list[str]:
    """The activation tensors feeding MatMul/Gemm nodes: the candidates for shift layers."""
    initializers = {i.name for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[0] not in initializers and node.input[0] not in names:
            names.append(node.input[0])
    return names


def _run(sess, tensors: list[str], batch: dict, limit: int | None):
    """(tensor, value) over `batch`, piece by piece for a model that fixes its batch size; a
    value never joins another piece's (a tensor of flattened tokens has no batch axis to join
    on); fill rows are dropped where the value has the piece's batch axis."""
    for piece, real in chunks(batch, limit):
        rows = len(next(iter(piece.values())))
        for name, value in zip(tensors, sess.run(tensors, piece)):
            value = np.asarray(value)
            yield name, value[:real] if real < rows and value.ndim and value.shape[0] == rows else value


def activation_ranges(model: onnx.ModelProto, examples: Examples, tensors: list[str],
                      percentile: float | None = None, batch_size: int = 32) -> dict[str, float]:
    """max |x| (or the given percentile of |x|) of each tensor over the examples."""
    augmented = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in outputs)
    sess = session(augmented.SerializeToString())
    limit = model_fixed_batch(model)   # inputs [1, …]: run piece by piece
    seen: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for batch in examples.batches(batch_size):
        for name, value in _run(sess, tensors, batch, limit):
            seen[name].append(np.abs(value).reshape(-1))
    ranges = {}
    for name, parts in seen.items():
        values = np.concatenate(parts)
        ranges[name] = float(values.max() if percentile is None else np.percentile(values, percentile))
    return ranges


def column_ranges(model: onnx.ModelProto, examples: Examples, tensors: list[str] | None = None,
                  batch_size: int = 32) -> dict[str, np.ndarray]:
    """max |x| per column (over every axis but the last) of each tensor over the examples, by
    default of the linear layers' inputs: what the report checks the accumulators against."""
    tensors = linear_inputs(model) if tensors is None else tensors
    augmented = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in outputs)
    sess = session(augmented.SerializeToString())
    limit = model_fixed_batch(model)   # inputs [1, …]: run piece by piece
    seen: dict[str, np.ndarray] = {}
    for batch in examples.batches(batch_size):
        for name, value in _run(sess, tensors, batch, limit):
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[-1] == 0:
                continue
            flat = value.reshape(-1, value.shape[-1])   # max |x| = max(max x, −min x), NaN ignored (x_q = 0)
            peak = np.fmax(np.fmax.reduce(flat, axis=0, initial=0.0), -np.fmin.reduce(flat, axis=0, initial=0.0))
            peak = peak.astype(np.float64)
            seen[name] = peak if name not in seen or seen[name].shape != peak.shape else np.maximum(seen[name], peak)
    return seen


def frac_bits_for(max_abs: float, act_bits: int) -> int:
    """The largest F in [−32, 32] with max_abs·2^F ≤ 2^(A−1) − 1 (no saturation at max_abs)."""
    if max_abs <= 0:
        return 32
    f = math.floor(math.log2((2 ** (act_bits - 1) - 1) / max_abs))
    while f > -32 and max_abs * 2.0 ** f > 2 ** (act_bits - 1) - 1:   # guard log2 rounding
        f -= 1
    return max(-32, min(32, f))


def calibrated_frac_bits(model: onnx.ModelProto, examples: Examples, act_bits: int,
                         percentile: float | None = None) -> dict[str, int]:
    """Fractional bits per linear-layer input tensor for act_bits-wide activations."""
    ranges = activation_ranges(model, examples, linear_inputs(model), percentile)
    return {name: frac_bits_for(r, act_bits) for name, r in ranges.items()}


def _linear_widths(model: onnx.ModelProto) -> dict[str, int]:
    """{activation tensor: in_features} of the MatMul/Gemm nodes with a constant 2-D weight."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    widths = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        dims = shapes[node.input[1]]
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        if len(dims) == 2 and node.input[0] not in shapes:
            widths.setdefault(node.input[0], dims[1] if trans_b else dims[0])
    return widths


def bounded_inputs(model: onnx.ModelProto) -> dict[str, tuple[float, str]]:
    """{linear input tensor: (max |x|, the producer that bounds it)} for the inputs whose producer
    bounds them whatever the model's input (LayerNorm, Softmax, Sigmoid/Tanh, Clip:
    passes/linear.py:known_input_bound, the bounds the accumulator check uses)."""
    from mfconvert.passes.linear import known_input_bound
    bounds = {}
    for tensor, width in _linear_widths(model).items():
        known = known_input_bound(model, tensor, width)
        if known is not None:
            bounds[tensor] = (float(np.max(known[0])), known[1])
    return bounds


def bounded_frac_bits(model: onnx.ModelProto, act_bits: int) -> dict[str, int]:
    """Without data: fractional bits per linear input whose range its producer bounds
    (bounded_inputs), the most that hold the bound; other inputs keep the configured format."""
    return {tensor: frac_bits_for(bound, act_bits) for tensor, (bound, _) in bounded_inputs(model).items()}


def format_overflows(model: onnx.ModelProto, act_bits: int, act_frac_bits: int,
                     by_input: dict[str, int] | None = None,
                     seen: dict[str, np.ndarray] | None = None) -> list[str]:
    """One line per linear input that can saturate its QA.F activation format: its producer's
    bound or (with data) its calibration range beyond 2^(A−1−F)."""
    lines = []
    bounds = bounded_inputs(model)
    for tensor in _linear_widths(model):
        frac = (by_input or {}).get(tensor, act_frac_bits)
        limit = (2 ** (act_bits - 1) - 1) * 2.0 ** -frac
        if seen is not None and tensor in seen and np.size(seen[tensor]) and float(np.max(seen[tensor])) > limit:
            reach, source = float(np.max(seen[tensor])), "on the calibration data"
        elif tensor in bounds and bounds[tensor][0] > limit:
            reach, source = bounds[tensor][0], f"as {bounds[tensor][1]} bounds it"
        else:
            continue
        lines.append(f"activation '{tensor}' reaches |x| = {reach:.4g} {source}, beyond Q{act_bits - frac}.{frac}'s "
                     f"{limit:.4g}: it saturates; fix: a lower --act-frac-bits, or --act-bits < 32 with --data")
    return lines
