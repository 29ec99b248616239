"""Reading, checking and writing ONNX files with one-line errors that name the file."""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np
import onnx
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues


class ConversionError(Exception):
    """A bad input or a refused request; the message is one line naming the file, node or flag."""


from mfconvert.convert.files import WriteError, check_outputs, create_temp, write_bytes_atomic  # noqa: E402 (files.py raises ConversionError)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    """(model, label for messages, size in bytes with any external-data files); a truncated or
    corrupt file, or an external-data reference that is missing, outside the model's directory or
    of the wrong length, is a ConversionError."""
    return read_model(source)[:3]


def read_model(source: str | os.PathLike | onnx.ModelProto, lazy: bool = False) -> tuple[onnx.ModelProto, str, int, dict[str, int]]:
    """load_model, and the external-data files read ({path: size}). `lazy`: tensors of BIG_TENSOR
    bytes or more stay in their file (attach_external_data reads them when a pass needs them)."""
    if isinstance(source, onnx.ModelProto):
        return source, "<model>", model_bytes(source), {}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf DecodeError, ...
        raise ConversionError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.graph.node:
        raise ConversionError(f"{path}: not an ONNX model with a graph (empty or truncated file?)")
    base = os.path.dirname(os.path.abspath(path))
    files = external_data_files(model, base, path)
    initializers = [t for graph in _graphs(model.graph) for t in graph.initializer]
    on_disk = {id(t) for t in initializers if lazy and _nbytes(t) >= BIG_TENSOR}   # attach_external_data's
    for tensor in initializers + list(_attribute_tensors(model)):
        if external_data_helper.uses_external_data(tensor) and id(tensor) not in on_disk:
            try:
                external_data_helper.load_external_data_for_tensor(tensor, base)
            except Exception as err:
                raise ConversionError(f"{path}: tensor '{tensor.name}': cannot read its external data "
                                      f"({_first_line(err)})") from None
    return model, path, os.path.getsize(path) + sum(files.values()), files


def check_model(model: onnx.ModelProto, label: str, path: str | None = None) -> None:
    """onnx's checker; on the file at `path` when the model keeps tensors in external data (the
    checker then also checks their files), on a light copy when it is too large to serialize."""
    try:
        if path is not None and any(external_data_helper.uses_external_data(t) for t in _tensors(model)):
            onnx.checker.check_model(path)
        elif inline_bytes(model) > HEAVY_BYTES:
            onnx.checker.check_model(light_copy(model))
        else:
            onnx.checker.check_model(model)
    except Exception as err:
        raise ConversionError(f"{label}: invalid ONNX model ({_first_line(err)})") from None
    if not model.graph.output:   # the checker lets it pass; every node would be dead code
        raise ConversionError(f"{label}: invalid ONNX model (the graph has no outputs)")
    check_initializers(model, label)


def check_initializers(model: onnx.ModelProto, label: str) -> None:
    """Each initializer holds as many values as its dims say (the checker does not look)."""
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        where = f"{label}: initializer '{init.name}' with dims {list(init.dims)}"
        if any(d < 0 for d in init.dims):
            raise ConversionError(f"{where}: negative dimension")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        except Exception:
            continue   # UNDEFINED or a type numpy has no dtype for: the checker's business
        packed = onnx.TensorProto.DataType.Name(init.data_type) in _PACKED_BITS   # several values a byte
        if packed and not init.HasField("raw_data"):
            continue
        if init.HasField("raw_data"):
            have, want = len(init.raw_data), _nbytes(init)
            unit = "bytes of raw data"
        else:
            try:
                onnx.numpy_helper.to_array(init)
                continue
            except Exception as err:
                raise ConversionError(f"{where}: its data does not match ({_first_line(err)})") from None
        if have != want:
            raise ConversionError(f"{where}: needs {want} {unit}, has {have}")


def output_path_for(input_path: str) -> str:
    """MODEL.onnx → MODEL.mf.onnx beside it."""
    root, ext = os.path.splitext(input_path)
    return f"{root}.mf{ext or '.onnx'}"


def check_output_path(output: str, input_path: str | None, force: bool) -> None:
    """The model output's rules (convert/files.py): never the input, not a directory, replaced only
    with `force`, in a directory that exists and can be written."""
    check_outputs({"": output}, {"the input model": input_path}, force)


def save_model_atomic(model: onnx.ModelProto, output: str, external: bool = False) -> int:
    """Write to a temporary file beside `output`, then rename: readers never see half a file.
    `external`, or a model too large for one protobuf: tensors of 1 KiB or more go to
    data_path_for(output) (save_external_atomic). Returns the bytes written."""
    if writes_external(model, external):
        return save_external_atomic(model, output)
    return write_bytes_atomic(output, model.SerializeToString())   # a WriteError (OSError) names `output`


# --- Models over 2 GiB: external data ------------------------------------------------------------
# A protobuf message cannot reach 2 GiB, and ByteSize()/SerializeToString() copy the whole model, so
# large tensors are never serialized with the rest: they are read from and written to external-data
# files (onnx's format: location/offset/length beside the model), and the checker and shape
# inference run on a light copy without them.

PROTO_LIMIT = 2 ** 31 - 1
HEADROOM = 64 << 20            # for everything but the tensors' bytes when estimating a model's size
HEAVY_BYTES = 256 << 20        # inline tensor bytes above which check/inference use a light copy
BIG_TENSOR = 1 << 20           # tensors this large stay on disk (lazy) and leave the light copy
EXTERNAL_THRESHOLD = 1024      # tensors this large go to the .data file when saving external data
_ALIGN = 4096                  # offsets in the .data file (ONNX Runtime can map page-aligned ones)
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2,
                "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}


def writes_external(model: onnx.ModelProto, external: bool = False) -> bool:
    """Whether save_model_atomic(model, …, external) writes a .data file."""
    return external or inline_bytes(model) > PROTO_LIMIT - HEADROOM


def check_serializable(model: onnx.ModelProto, label: str, what: str) -> None:
    """Refuse, naming `what`, a model over the protobuf limit for a step that runs it in ONNX
    Runtime from memory (calibration, --max-drop, finetuning): conversion alone takes any size."""
    size = inline_bytes(model)
    if size > PROTO_LIMIT - HEADROOM:
        raise ConversionError(f"{label}: {what} runs the model from memory, which protobuf limits to 2 GiB, "
                              f"and it holds {size / 2 ** 30:.2f} GiB of weights; convert without {what}")


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size; its tensor bytes alone when that is large (ByteSize serializes)."""
    heavy = inline_bytes(model)
    return heavy if heavy > HEAVY_BYTES else model.ByteSize()


def data_path_for(output: str) -> str:
    """Where a model written with external data keeps its tensors: OUTPUT.data beside it."""
    return output + ".data"


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's values take in raw_data, from its dims and type (-1 if unknown)."""
    if any(d < 0 for d in tensor.dims):
        return -1
    n = math.prod(tensor.dims)
    try:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        if name in _PACKED_BITS:
            return (n * _PACKED_BITS[name] + 7) // 8
        if name in ("UNDEFINED", "STRING"):
            return -1
        return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return -1


def _graphs(graph: onnx.GraphProto):
    """`graph` and its subgraphs (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _attribute_tensors(model: onnx.ModelProto):
    """Tensors in node attributes (a Constant's value, ...), in all graphs."""
    for graph in _graphs(model.graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _tensors(model: onnx.ModelProto):
    """Every TensorProto that can hold weights: initializers and tensor attributes, in all graphs."""
    for graph in _graphs(model.graph):
        yield from graph.initializer
    yield from _attribute_tensors(model)


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the model's raw_data fields (from dims: reading a large bytes
    field copies it)."""
    return sum(max(_nbytes(t), 0) for t in _tensors(model) if t.HasField("raw_data"))


def external_data_files(model: onnx.ModelProto, base_dir: str, label: str) -> dict[str, int]:
    """{path: size} of the files the model's external-data tensors live in, after checking each
    reference: a relative location inside `base_dir` (no '..', no symlink out of it), a regular
    file, offset + length within it, and length = the bytes the tensor's dims and type need."""
    files: dict[str, int] = {}
    real_base = os.path.realpath(base_dir)
    for tensor in _tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        where = f"{label}: tensor '{tensor.name}'"
        try:
            info = external_data_helper.ExternalDataInfo(tensor)
        except ValueError as err:
            raise ConversionError(f"{where}: bad external data reference ({_first_line(err)})") from None
        location = info.location
        path = os.path.realpath(os.path.join(real_base, location))
        if not location or os.path.isabs(location) or os.path.commonpath([path, real_base]) != real_base:
            raise ConversionError(f"{where}: external data location {location!r} is not a file in the "
                                  f"model's directory {base_dir}")
        if not os.path.isfile(path):
            raise ConversionError(f"{where}: external data file {os.path.join(base_dir, location)} does not exist")
        size = files.setdefault(path, os.path.getsize(path))
        offset = info.offset or 0
        length = size - offset if info.length is None else info.length
        want = _nbytes(tensor)
        if offset + length > size or (want >= 0 and length != want):
            raise ConversionError(f"{where}: external data at offset {offset}, length {length} in "
                                  f"{os.path.join(base_dir, location)} ({size} bytes); the tensor's dims "
                                  f"{list(tensor.dims)} need {want} bytes")
    return files


def external_data_reads(*paths) -> dict[str, str]:
    """{label: path} of the external-data files the models at `paths` refer to, for check_outputs
    (a file the command reads is never written); a model that cannot be read gives none (loading
    it says why)."""
    reads = {}
    for path in paths:
        if path is None or not os.path.isfile(path):
            continue
        try:
            model = onnx.load(os.fspath(path), load_external_data=False)
        except Exception:
            continue
        base = os.path.dirname(os.path.abspath(path))
        for tensor in _tensors(model):
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if external_data_helper.uses_external_data(tensor) and location:
                reads[f"the external data of {os.fspath(path)} ({location})"] = os.path.join(base, location)
    return reads


def _copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy the set fields of protobuf message `src` into `dst`, but for those named in `skip`
    (never read: reading a bytes field copies it, ListFields reads them all)."""
    for field in src.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "extend"):        # a repeated field
            target.extend(getattr(src, field.name))
        elif src.HasField(field.name):
            if hasattr(target, "CopyFrom"):  # a message
                target.CopyFrom(getattr(src, field.name))
            else:
                setattr(dst, field.name, getattr(src, field.name))


def _is_big(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor) or (
        tensor.HasField("raw_data") and _nbytes(tensor) >= BIG_TENSOR)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for the checker and shape inference, without the bytes of its large
    main-graph initializers: each becomes a graph input of the same type and shape."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if not _is_big(init):
            light.graph.initializer.append(init)
        elif init.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return light


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes that also takes a model too large to serialize: inference
    runs on its light copy and the types found are put into `model` itself (returned)."""
    if inline_bytes(model) <= HEAVY_BYTES:
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    inferred = onnx.shape_inference.infer_shapes(light_copy(model), **kwargs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    if [o.name for o in inferred.graph.output] == [o.name for o in model.graph.output]:
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
    return model


class _OnDisk(LazyValues):
    """The values of an external-data tensor, read from its file when a pass first needs them:
    one array, no intermediate bytes object (onnx's reader holds the file's bytes and a copy)."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        info = external_data_helper.ExternalDataInfo(self.tensor)
        name = onnx.TensorProto.DataType.Name(self.tensor.data_type)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type))
        if dtype.kind not in "biufc" or name in _PACKED_BITS or sys.byteorder != "little":
            return np.array(onnx.numpy_helper.to_array(self.tensor, self.base_dir))
        dims = tuple(self.tensor.dims)
        return np.fromfile(os.path.join(self.base_dir, info.location), dtype=dtype, count=math.prod(dims),
                           offset=info.offset or 0).reshape(dims)


def attach_external_data(graph, base_dir: str) -> None:
    """Make the constants of an imported graph (onnx_graphsurgeon) that still refer to external data
    read it from `base_dir` when used; unused ones are exported as references (load_external_data)."""
    for g in (graph, *graph.subgraphs(recursive=True)):
        for tensor in g.tensors().values():
            values = getattr(tensor, "_values", None)
            if type(values) is LazyValues and external_data_helper.uses_external_data(values.tensor):
                tensor._values = _OnDisk(values.tensor, base_dir)


def load_external_data(model: onnx.ModelProto, base_dir: str, label: str) -> None:
    """Read into `model` the tensors that still refer to external data in `base_dir`."""
    for tensor in _tensors(model):
        if external_data_helper.uses_external_data(tensor):
            try:
                external_data_helper.load_external_data_for_tensor(tensor, base_dir)
            except Exception as err:
                raise ConversionError(f"{label}: tensor '{tensor.name}': cannot read its external data "
                                      f"({_first_line(err)})") from None


def save_external_atomic(model: onnx.ModelProto, output: str) -> int:
    """Write `model` as OUTPUT (the graph) and OUTPUT.data (the main-graph initializers of
    EXTERNAL_THRESHOLD bytes or more, at 4 KiB-aligned offsets, referred to by the relative location
    'OUTPUT.data'): both through exclusive temporary files beside them, the data renamed into place
    first, then the model. `model` is not changed; no second copy of the tensors is made (each is
    written as it is read). Returns the bytes written."""
    parent = os.path.dirname(os.path.abspath(output))
    data_path = data_path_for(output)
    location = os.path.basename(data_path)
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    temps = []
    try:
        fd, tmp_data = create_temp(parent)
        temps.append(tmp_data)
        with os.fdopen(fd, "wb") as f:
            for init in model.graph.initializer:
                if external_data_helper.uses_external_data(init):
                    raise ValueError(f"tensor '{init.name}' still refers to external data")
                if not init.HasField("raw_data") or _nbytes(init) < EXTERNAL_THRESHOLD:
                    light.graph.initializer.append(init)
                    continue
                offset = -f.tell() % _ALIGN + f.tell()
                f.seek(offset)
                raw = init.raw_data
                f.write(raw)
                copy = light.graph.initializer.add()
                _copy_fields(init, copy, skip=("raw_data", "data_location", "external_data"))
                copy.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    entry = copy.external_data.add()
                    entry.key, entry.value = key, str(value)
                del raw
            data_bytes = f.tell()
            f.flush()
            os.fsync(f.fileno())
        fd, tmp_model = create_temp(parent)
        temps.append(tmp_model)
        graph_bytes = light.SerializeToString()
        with os.fdopen(fd, "wb") as f:
            f.write(graph_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_data, data_path)
        temps.remove(tmp_data)
        os.replace(tmp_model, output)
        temps.remove(tmp_model)
    except OSError as err:
        raise WriteError(output, err) from None
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return data_bytes + len(graph_bytes)
