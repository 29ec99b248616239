"""The op registry: one implementation per (domain, op) and first opset it serves, as in
onnx.reference. An implementation takes (attrs, *inputs): attrs holds the node's attributes over
the schema's defaults for the model's opset, plus `_opset` and `_nout` (the node's output count);
absent optional inputs are None. It returns a tensor or a tuple (optional outputs computed only
when `_nout` asks for them)."""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import torch

OPS: dict[tuple[str, str], list[tuple[int, object]]] = {}
MS = "com.microsoft"


def op(names: str, since: int = 1, domain: str = ""):
    """Register the decorated function for each op in `names` from opset `since` on."""
    def deco(fn):
        for name in names.split():
            versions = OPS.setdefault((domain, name), [])
            versions.append((since, fn))
            versions.sort(key=lambda v: v[0])
        return fn
    return deco


def norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def lookup(domain: str, op_type: str, opset: int):
    """The implementation serving `op_type` at `opset`, or None."""
    versions = OPS.get((norm_domain(domain), op_type))
    if not versions:
        return None
    chosen = [fn for since, fn in versions if since <= opset]
    return chosen[-1] if chosen else versions[0][1]


@functools.lru_cache(maxsize=None)
def schema_defaults(domain: str, op_type: str, opset: int) -> dict:
    """Attribute defaults of the op's schema at `opset` (empty when ONNX has no schema)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:   # noqa: BLE001 - custom domains (com.microsoft) have no schema here
        return {}
    out = {}
    for name, attr in schema.attributes.items():
        if attr.default_value.type != onnx.AttributeProto.UNDEFINED:
            out[name] = onnx.helper.get_attribute_value(attr.default_value)
            if isinstance(out[name], bytes):
                out[name] = out[name].decode()
            elif isinstance(out[name], list) and out[name] and isinstance(out[name][0], bytes):
                out[name] = [v.decode() for v in out[name]]
    return out


def attributes(node: onnx.NodeProto, opset: int | None = None) -> dict:
    """The node's attributes (strings decoded) over its schema's defaults at `opset`."""
    out = dict(schema_defaults(norm_domain(node.domain), node.op_type, opset)) if opset else {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


# ---------------------------------------------------------------------------------- dtypes
P = onnx.TensorProto
DTYPES = {
    P.FLOAT: torch.float32, P.DOUBLE: torch.float64, P.FLOAT16: torch.float16, P.BFLOAT16: torch.bfloat16,
    P.INT64: torch.int64, P.INT32: torch.int32, P.INT16: torch.int16, P.INT8: torch.int8,
    P.UINT8: torch.uint8, P.BOOL: torch.bool, P.UINT16: torch.uint16, P.UINT32: torch.uint32,
    P.UINT64: torch.uint64, P.COMPLEX64: torch.complex64, P.COMPLEX128: torch.complex128,
}
ONNX_OF = {v: k for k, v in DTYPES.items()}
# Unsigned types torch stores but computes little with: arithmetic runs in int64 and casts back.
NARROW_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def tdtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in DTYPES:
        raise ValueError(f"ONNX element type {onnx.helper.tensor_dtype_to_string(onnx_type)} has no torch dtype "
                         "(2-bit, 4-bit and 8-bit float types are left out)")
    return DTYPES[onnx_type]


def wide(x):
    """x as a dtype torch computes with (uint16/32/64 → int64)."""
    return x.to(torch.int64) if x is not None and x.dtype in NARROW_UNSIGNED else x


def ints(t) -> list[int]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def floats(t) -> list[float]:
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.reshape(-1).tolist()]
    return [float(v) for v in t]


def scalar(t):
    return t.reshape(-1)[0].item() if isinstance(t, torch.Tensor) else t


def to_tensor(value: np.ndarray) -> torch.Tensor:
    value = np.asarray(value)
    if value.dtype == object:
        raise ValueError("string tensors are not supported by the PyTorch executor")
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(value, copy=True))


def prod(xs) -> int:
    return math.prod(int(x) for x in xs)
