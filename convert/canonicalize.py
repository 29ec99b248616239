"""Canonical shapes for analysis (issue 11, item 4): the shape of every tensor at the input shapes
given (--input-shape, the model's static dims), symbolic where a dim is left dynamic.

The tool is ONNX Runtime's symbolic shape inference (onnxruntime.tools.symbolic_shape_infer,
shipped with onnxruntime): it evaluates shape subgraphs (Shape → Gather → Concat → Reshape, Pad
and Slice arguments, Range, ConstantOfShape) with sympy, which folds them when the inputs are fixed
and keeps named symbols where they are not. It only adds value_info: nodes, names, inputs, outputs
and dynamic axes stay as they are, so what it finds is keyed by the tensor names the passes see.
onnx's own inference (data_prop) stops at many third-party exports' shape arithmetic (the batch of
a pytorch ResNet's head, a tf2onnx Reshape); ORT's basic optimisation folds it too but rewrites
the graph (MatMul+Add → Gemm, Casts removed, new opset imports) and needs the weights; onnxslim and
onnx-simplifier are further dependencies and bake the fixed shapes into the graph.

Used where shapes are asked: the report's per-layer row counts (convert/onnx_entry.py), and
``canonical_shapes`` for any matcher that needs a tensor's dims. The converted model itself is
never specialised to the shapes given.
"""
from __future__ import annotations

import logging

import onnx

from mfconvert.convert.onnx_model import light_copy

Dims = list   # ints, or str for a symbolic dim


def fixed_copy(model: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """A light copy of `model` (large tensors as inputs) whose inputs named in `shapes` have those
    dims; its old value_info dropped (it may hold a different exporter's guesses)."""
    fixed = light_copy(model)
    for inp in fixed.graph.input:
        if shapes and inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, value in zip(dims, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = value
    del fixed.graph.value_info[:]
    return fixed


def canonicalize(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """`model` (light copy) with the value_info of ORT's symbolic shape inference at `shapes`.

    Raises RuntimeError with the first line of ORT's reason when inference fails."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, logger as ort_logger

    fixed = fixed_copy(model, shapes)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 7 for o in fixed.opset_import):
        raise RuntimeError("symbolic shape inference needs opset 7 or later")
    level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)   # its per-node warnings are ours to summarise
    try:
        # SymbolicShapeInference.infer_shapes without its ending: when a shape stays open it saves
        # the model as sym_shape_infer_temp.onnx in the working directory and raises; we keep
        # the partial result instead (every shape it did find is right).
        ssi = SymbolicShapeInference(2**31 - 1, True, False, 0)
        ssi._preprocess(fixed)
        for _ in range(16):   # a pass reruns when it merged symbols; some graphs never settle
            if not ssi.run_:
                break
            ssi._infer_impl()
        else:
            raise RuntimeError("did not settle after 16 passes")
        ssi._update_output_from_vi()
        inferred = ssi.out_mp_
    except Exception as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise RuntimeError(f"{type(err).__name__}: {first}") from None
    finally:
        ort_logger.setLevel(level)
    return inferred


def canonical_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> dict[str, Dims]:
    """Dims of every tensor with a known rank: int where known, str for a symbol."""
    inferred = canonicalize(model, shapes)
    found = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return found


def canonical_rows(model: onnx.ModelProto, shapes: dict[str, list[int]], names,
                   notes: list[str] | None = None, found: dict | None = None) -> dict[str, int]:
    """Rows (product of all dims but the last) of the tensors `names` whose dims are all known and
    non-negative at `shapes`; `notes` gets why when inference fails or a dim comes out negative
    (inputs too short for the model's convolutions or frames); `found` gets those tensors' dims."""
    try:
        dims = canonical_shapes(model, shapes)
    except RuntimeError as err:
        if notes is not None:
            notes.append(f"multiplication counts unknown: symbolic shape inference at {shapes} failed: {err}")
        return {}
    rows = {}
    for name in names:
        d = dims.get(name)
        if not d or not all(isinstance(v, int) for v in d):
            continue
        if any(v < 0 for v in d):
            if notes is not None:
                notes.append(f"multiplication counts unknown: at {shapes} '{name}' comes out with shape {d}: "
                             "the inputs are too small for the model; --input-shape sets them")
            continue
        n = 1
        for v in d[:-1]:
            n *= v
        rows[name] = n
        if found is not None:
            found[name] = d
    return rows
