"""convert_onnx: run the enabled passes over an ONNX model and report what changed."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

# graphsurgeon prints its warnings to stdout (and asks for the `colored` module on the first):
# shadowed names in subgraphs and duplicate node names are valid ONNX, and what matters reaches the
# report in our words. Every mfconvert import runs this module (mfconvert/__init__.py).
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
gs.logger.G_LOGGER.colors = False

from mfconvert.convert.config import ConvertConfig
from mfconvert.convert.onnx_model import (_PACKED_BITS, ConversionError, _first_line, _nbytes,
                                          attach_external_data, check_model, check_output_path,
                                          data_path_for, read_model, infer_shapes, light_copy,
                                          load_external_data, model_bytes, save_model_atomic,
                                          writes_external, PROTO_LIMIT)
from mfconvert.convert.files import check_outputs
from mfconvert.convert.canonicalize import canonical_rows
from mfconvert.ort_ops import DOMAIN, OPSET_VERSION
from mfconvert.passes import pass_for
from mfconvert.passes.graph import claim
from mfconvert.passes.linear import accumulator_checks, annotate_accumulators
from mfconvert.passes.registry import PassError
from mfconvert.passes.report import ConversionReport


@dataclass
class ConversionResult:
    model: onnx.ModelProto
    report: ConversionReport
    output: str | None
    data_file: str | None = None   # OUTPUT.data: the tensors of a model written with external data
    external: bool = False         # whether it is (to be) written with external data


def save_result(result: ConversionResult, output: str, model: onnx.ModelProto | None = None) -> None:
    """Write `model` (default: result.model) to `output` atomically, with external data where the
    conversion reads it or the model is too large for one protobuf; updates `result` (model,
    output, data_file, the report's file size)."""
    model = result.model if model is None else model
    external = writes_external(model, result.external)
    result.report.file_bytes_after = save_model_atomic(model, output, external=external)
    result.model, result.output = model, output
    result.data_file = data_path_for(output) if external else None


def convert_onnx(source, config: ConvertConfig | None = None, output: str | None = None,
                 input_shapes: dict[str, list[int]] | None = None, force: bool = False,
                 progress=None, allow_unchanged: bool = False,
                 input_ranges: dict | None = None, counts: bool = True) -> ConversionResult:
    """Convert `source` (path or ModelProto); write to `output` atomically when given.

    A model in which no pass changes anything is an error (naming the skip reasons) unless
    `allow_unchanged`.
    `input_shapes` fixes dynamic input dims for the report's per-inference counts (dims not
    given default to 1). `progress(pass_name)` is called as each pass starts.
    `input_ranges` (max |x| per column of linear inputs on calibration data,
    calibrate/activation_stats.py:column_ranges) lets the report check the accumulators against
    the data instead of the weights alone. `counts=False` (a conversion only measured, never
    written: calibrate/sensitivity.py) skips the converted model's check, the accumulator checks
    and the report's row counts.
    """
    config = config or ConvertConfig()
    model, label, size_before, data_files = read_model(source, lazy=True)   # large external tensors stay on disk
    input_path = None if isinstance(source, onnx.ModelProto) else os.fspath(source)
    base_dir = input_path and os.path.dirname(os.path.abspath(input_path))
    # A model read with external data, or too large for one protobuf, is written with external data.
    external = bool(data_files) or size_before > PROTO_LIMIT // 2
    if output is not None:
        check_output_path(output, input_path, force)
        reads = {"the input model": input_path, **{f"the input's external data {f}": f for f in data_files}}
        for path in [output] + ([data_path_for(output)] if external else []):
            check_outputs({"": path}, reads, force)
    check_model(model, label, path=input_path)
    shapes = resolve_input_shapes(model, input_shapes or {}, label)
    typed = infer_shapes(model)   # dtypes let passes check activations

    graph = gs.import_onnx(typed)
    if base_dir:
        attach_external_data(graph, base_dir)
    results = []
    for cfg in config.enabled():
        spec = pass_for(cfg)
        if progress:
            progress(spec.name)
        try:
            result = spec.run(graph, cfg)
        except PassError as err:
            raise ConversionError(f"{label}: {err}") from None
        claim(graph, result.claims, spec.name)   # the passes after it leave them alone (claimant)
        result.claims = []   # recorded: the report need not hold the graph's nodes (and their arrays)
        results.append(result)

    if not allow_unchanged and not any(r.changes for r in results):
        skips = [s for r in results for s in r.skips]
        why = "; ".join(f"{s.node}: {s.reason}" for s in skips[:3]) + (" …" if len(skips) > 3 else "")
        raise ConversionError(f"{label}: nothing to convert ({len(skips)} candidates skipped"
                              + (f": {why})" if skips else ", none found)"))
    if any(r.changes for r in results):
        try:
            converted = _export(graph, model, config, results)
        except ValueError as err:   # graphsurgeon cannot write back the 2/4-bit tensors it has read
            packed = [t.name for t in model.graph.initializer if _nbytes(t) >= 0 and
                      onnx.TensorProto.DataType.Name(t.data_type) in _PACKED_BITS]
            raise ConversionError(f"{label}: cannot write the converted graph ({_first_line(err)})"
                                  + (f"; 2/4-bit initializers such as '{packed[0]}' are not supported"
                                     if packed else "")) from None
    else:   # nothing converted: the graph verbatim (a graphsurgeon round trip reorders nodes and
        converted = onnx.ModelProto()   # makes subgraph Constants initializers)
        converted.CopyFrom(model)
        onnx.helper.set_model_props(converted, {**{p.key: p.value for p in model.metadata_props},
                                                **{k: v for r in results for k, v in r.metadata.items()},
                                                "mfconvert.config": json.dumps(config.to_dict())})
    if base_dir:
        load_external_data(converted, base_dir, label)   # external tensors no pass changed
    if not counts:
        return ConversionResult(converted, ConversionReport(results, shapes, size_before, 0), None,
                                external=external)
    check_model(converted, f"{label} (converted)")
    annotate_accumulators([c for r in results for c in r.changes], accumulator_checks(converted, input_ranges))
    notes: list[str] = []
    rows = activation_rows(model, shapes, notes)
    changes = [c for r in results for c in r.changes]
    open_tokens = [c for c in changes if getattr(c, "tokens", 0) is None]   # attention over dynamic T
    wanted = {c.activation for c in changes if c.activation and rows.get(c.activation, -1) < 0}
    wanted |= {getattr(c, "tokens_tensor", None) or c.activation for c in open_tokens if c.activation}
    if wanted:   # left open (or negative) by onnx's inference: ORT's symbolic one (canonicalize.py)
        more: list[str] = []
        dims: dict = {}
        for name in wanted:
            rows.pop(name, None)
        rows.update(canonical_rows(model, shapes, wanted, more, dims))
        if not notes or all(a in rows for a in wanted):
            notes[:] = more
        for c in open_tokens:   # its query [B, T, C] (or its tokens_tensor's tokens_axis) gives T
            d = dims.get(getattr(c, "tokens_tensor", None) or c.activation, ())
            if len(d) == 3 or (getattr(c, "tokens_tensor", None) and len(d) >= 2):
                c.tokens = d[getattr(c, "tokens_axis", 1)]
    for result in results:
        for change in result.changes:
            change.rows = rows.get(change.activation)
    open_rows = [c.node for r in results for c in r.changes if c.rows is None]
    if open_rows and not notes:
        notes.append(f"multiplication counts unknown for {len(open_rows)} layer(s) (first: {open_rows[0]}): shape "
                     f"inference at {shapes} left their input shapes open"
                     + ("" if input_shapes else "; dynamic dims were taken as 1, --input-shape sets them"))
    size_after = model_bytes(converted)
    data_file = None
    if output is not None:
        external = writes_external(converted, external)
        size_after = save_model_atomic(converted, output, external=external)
        data_file = data_path_for(output) if external else None
    report = ConversionReport(results, shapes, size_before, size_after, notes=notes)
    result = ConversionResult(converted, report, output, data_file, external=external)
    report.attach_models(model, lambda: result.model)   # counted when asked, on the model the result holds then
    return result


def _export(graph: gs.Graph, original: onnx.ModelProto, config: ConvertConfig, results) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    # Passes never change the model's interface: keep the original declarations verbatim
    # (graphsurgeon drops their metadata, e.g. the dynamo exporter's input kinds).
    for mine, theirs in ((model.graph.input, original.graph.input), (model.graph.output, original.graph.output)):
        if [v.name for v in mine] == [v.name for v in theirs]:
            del mine[:]
            mine.extend(theirs)
    model.ir_version = original.ir_version
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    del model.opset_import[:]
    model.opset_import.extend(o for o in original.opset_import if o.domain != DOMAIN)
    if any(n.domain == DOMAIN for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    model.metadata_props.extend(original.metadata_props)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        **{k: v for r in results for k, v in r.metadata.items()},
                                        "mfconvert.config": json.dumps(config.to_dict())})
    return model


def resolve_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]], label: str) -> dict[str, list[int]]:
    """Concrete dims for every graph input: given ones, static ones, and 1 for the rest."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise ConversionError(f"--input-shape names '{name}', but {label} has inputs {names}")
    shapes = {}
    for inp in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        if inp.name in given:
            if len(given[inp.name]) != len(dims):
                raise ConversionError(f"--input-shape {inp.name} has rank {len(given[inp.name])}, "
                                      f"the model's input has rank {len(dims)}")
            dims = list(given[inp.name])
        shapes[inp.name] = dims
    return shapes


def activation_rows(model: onnx.ModelProto, shapes: dict[str, list[int]],
                    notes: list[str] | None = None) -> dict[str, int]:
    """Rows (product of all dims but the last) of every tensor, at the given input shapes; when
    shape inference fails, none, and `notes` gets why (the error's first line)."""
    fixed = light_copy(model)   # without the large tensors' bytes
    for inp in fixed.graph.input:
        if inp.name in shapes:
            for dim, value in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = value
    del fixed.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as err:   # the counts are optional: say why they are missing
        if notes is not None:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            notes.append(f"multiplication counts unknown: shape inference at {shapes} failed: {first}")
        return {}
    rows = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            n = 1
            for d in dims[:-1]:
                n *= d.dim_value
            rows[vi.name] = n
    return rows
