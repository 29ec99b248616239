"""Reading, checking and writing ONNX files with one-line errors that name the file."""
from __future__ import annotations

import os
import tempfile

import onnx


class ConversionError(Exception):
    """A bad input or a refused request; the message is one line naming the file, node or flag."""


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    """(model, label for messages, size in bytes); a truncated or corrupt file is a ConversionError."""
    if isinstance(source, onnx.ModelProto):
        return source, "<model>", source.ByteSize()
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf DecodeError, external-data errors, ...
        raise ConversionError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.graph.node:
        raise ConversionError(f"{path}: not an ONNX model with a graph (empty or truncated file?)")
    return model, path, os.path.getsize(path)


def check_model(model: onnx.ModelProto, label: str) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ConversionError(f"{label}: invalid ONNX model ({_first_line(err)})") from None


def output_path_for(input_path: str) -> str:
    """MODEL.onnx → MODEL.mf.onnx beside it."""
    root, ext = os.path.splitext(input_path)
    return f"{root}.mf{ext or '.onnx'}"


def check_output_path(output: str, input_path: str | None, force: bool) -> None:
    if input_path and os.path.exists(output) and os.path.samefile(output, input_path):
        raise ConversionError(f"{output}: refusing to overwrite the input model; choose another -o")
    if os.path.exists(output) and not force:
        raise ConversionError(f"{output}: already exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ConversionError(f"{output}: directory {parent} does not exist")


def save_model_atomic(model: onnx.ModelProto, output: str) -> int:
    """Write to a temporary file beside `output`, then rename: readers never see half a file."""
    data = model.SerializeToString()
    parent = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".mfconvert-", suffix=".onnx.tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)
