"""Calibration of ShiftConv layers: compensated rounding over the im2col view, bias correction,
and BatchNormalization statistics re-estimated after conversion.

A ShiftConv is a ShiftLinear on the im2col rows of each group (nn/shift_conv.py), so GPTQ's
rounding (calibrate/rounding.py) applies per group with H_g = Σ r rᵀ over the rows r of group g:
a dense conv has one H [C·k, C·k], a depthwise conv one small H [k, k] per channel (rounded all at
once here, one column of every group per step). calibrate/rounding.py collects these statistics
(ConvStats) in its forward pass and calls round_conv_layer for ShiftConv layers.

Bias correction (Nagel et al., 2019): the rounding moves each output's mean by (Ŵ − W)·E[r]; with
E[r] measured on the same rows, b −= (Ŵ − W)·E[r] puts it back (W: the float weight the layer
started from).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from mfconvert.nn import pow2
from mfconvert.nn.shift_conv import ShiftConv

# im2col rows are formed for this many elements at a time (images of a batch in chunks): a
# depthwise conv at 112×112 on 32 images would otherwise take gigabytes.
CHUNK_ELEMENTS = 1 << 24


class ConvStats:
    """Σ r rᵀ [G, K, K] (float64), Σ r [G, K] and the row count over a ShiftConv's im2col rows."""

    def __init__(self, layer: ShiftConv):
        g, k = layer.group, layer.in_features
        self.hessian = torch.zeros(g, k, k, dtype=torch.float64)
        self.total = torch.zeros(g, k, dtype=torch.float64)
        self.rows = 0

    def output_error(self, weight: torch.Tensor, rounded: torch.Tensor) -> float:
        """Σ‖(W − Q) r‖² over the rows: Σ_g tr((W_g − Q_g) H_g (W_g − Q_g)ᵀ), weights [M, K]."""
        g = self.hessian.shape[0]
        d = (weight.to(torch.float64) - rounded.to(torch.float64)).reshape(g, -1, self.hessian.shape[1])
        return float((torch.bmm(d, self.hessian) * d).sum())

    @torch.no_grad()
    def add(self, layer: ShiftConv, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        per_image = layer.group * layer.in_features * int(np.prod(x.shape[2:])) // int(np.prod(layer.strides))
        step = max(1, CHUNK_ELEMENTS // max(per_image, 1))
        for start in range(0, x.shape[0], step):
            cols = layer.im2col(x[start:start + step])                              # [G, R, K]
            self.hessian += torch.bmm(cols.transpose(1, 2), cols).to(torch.float64)   # float32 products
            self.total += cols.sum(1).to(torch.float64)
            self.rows += cols.shape[1]


def _quantizer(layer: ShiftConv):
    """w32 [M, n] → its rounded value on the layer's grid (greedy sums of `terms` powers of two,
    row o at the layer's exponent e_o)."""
    def quantize(w32: torch.Tensor) -> torch.Tensor:
        parts = pow2.residual_terms(w32, layer.exponent, layer.weight_bits, layer.terms)
        return pow2.round_weight(parts, layer.exponent, layer.weight_bits).sum(0)
    return quantize


@torch.no_grad()
def grouped_compensated_rounding(weight: torch.Tensor, hessian: torch.Tensor, round_columns, damping: float,
                                 act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for G independent groups at once: weight [G, Mg, K], hessian [G, K, K];
    round_columns(w [G, Mg]) rounds one column of every group. Returns (rounded, latent), both
    [G, Mg, K], as calibrate/rounding.compensated_rounding does for one group (unblocked: K is
    small for the grouped convs that take this path)."""
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    g, mg, k = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0                                          # inputs that were always zero
    diag[dead] = 1.0                                          # (a view: sets H's diagonal)
    w.masked_fill_(dead[:, None, :], 0.0)
    order = torch.argsort(diag, dim=1, descending=True, stable=True) if act_order else \
        torch.arange(k).expand(g, k)
    w = torch.gather(w, 2, order[:, None, :].expand(g, mg, k))
    h = torch.gather(torch.gather(h, 1, order[:, :, None].expand(g, k, k)), 2, order[:, None, :].expand(g, k, k))
    h += damping * torch.diagonal(h, dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded, latent = torch.zeros_like(w), torch.zeros_like(w)
    for j in range(k):
        column = w[:, :, j].clone()
        q = round_columns(column)
        rounded[:, :, j], latent[:, :, j] = q, column
        err = (column - q) / u[:, j, j][:, None]
        w[:, :, j:] -= err[:, :, None] * u[:, j, j:][:, None, :]
    inverse = torch.argsort(order, dim=1)[:, None, :].expand(g, mg, k)
    return torch.gather(rounded, 2, inverse), torch.gather(latent, 2, inverse)


@torch.no_grad()
def round_conv_layer(layer: ShiftConv, stats: ConvStats, damping: float, act_order: bool = True,
                     correct_bias: bool = True) -> None:
    """Re-round a DeepShift-Q ShiftConv's latent weight by compensated rounding per group on its
    im2col statistics, in place; then bias correction where the layer has a bias."""
    from mfconvert.calibrate.rounding import compensated_rounding   # (rounding.py imports this module)

    if layer.mode != "Q":
        raise ValueError("compensated rounding needs a ShiftConv in mode 'Q' (latent float weights)")
    quantize = _quantizer(layer)
    start = layer.float_weight().to(torch.float32)                    # [M, K]
    g, mg = layer.group, layer.out_channels // layer.group
    if g == 1:
        def round_column(column: torch.Tensor, _index: int) -> torch.Tensor:
            return quantize(column.to(torch.float32)[:, None])[:, 0].to(torch.float64)
        rounded, latent = compensated_rounding(start, stats.hessian[0], round_column, damping, act_order)
    else:
        def round_columns(columns: torch.Tensor) -> torch.Tensor:      # [G, Mg]: rows g·Mg + i
            return quantize(columns.reshape(-1, 1).to(torch.float32)).reshape(g, mg).to(torch.float64)
        rounded, latent = grouped_compensated_rounding(start.reshape(g, mg, -1), stats.hessian, round_columns,
                                                       damping, act_order)
        rounded, latent = rounded.reshape(layer.out_channels, -1), latent.reshape(layer.out_channels, -1)
    latent32, rounded32 = latent.to(torch.float32), rounded.to(torch.float32)
    layer.set_latent_weight(torch.where(quantize(latent32) == rounded32, latent32, rounded32))
    if correct_bias:
        correct_conv_bias(layer, stats, start)


@torch.no_grad()
def correct_conv_bias(layer: ShiftConv, stats: ConvStats, start: torch.Tensor) -> None:
    """b −= (Ŵ − W)·E[r] per group, Ŵ the weights the layer rounds to now, W = `start` [M, K] the
    float weight it was rounded from, E[r] the mean im2col row of the statistics. Nothing without
    a bias."""
    if layer.bias is None or not stats.rows:
        return
    g, mg = layer.group, layer.out_channels // layer.group
    mean = (stats.total / stats.rows).to(torch.float64)                   # [G, K]
    rounded = layer.rounded_weight().detach().reshape(layer.out_channels, -1).double()
    drift = ((rounded - start.double()).reshape(g, mg, -1) @ mean[:, :, None]).reshape(-1)
    layer.bias -= drift.to(torch.float32)


# -- BatchNormalization statistics after conversion -----------------------------------------------

def reestimate_batchnorm(student: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], session_fn) -> tuple[onnx.ModelProto, list[str]]:
    """The student with the running mean and variance of every BatchNormalization it kept
    (inference mode, constant statistics) replaced by those of its inputs on `feeds` as the
    converted model computes them (per channel over batch and spatial positions); the names of
    the nodes changed. `session_fn(model_bytes)` gives an ONNX Runtime session with our ops."""
    inits = {i.name: i for i in student.graph.initializer}
    producer = {o: n for n in student.graph.node for o in n.output}

    def shift_add_affine(bn) -> bool:
        """shift-add-conv's BatchNormalization (ShiftConv → AdderConv → it) is an exact affine map
        (scale −1, mean −Σ L_c; passes/adder_conv.py), not statistics: left as it is."""
        adder = producer.get(bn.input[0])
        shift = producer.get(adder.input[0]) if adder is not None and adder.op_type == "AdderConv" else None
        return shift is not None and shift.op_type == "ShiftConv"

    bns = [n for n in student.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
           and len(n.input) >= 5 and n.input[3] in inits and n.input[4] in inits and not shift_add_affine(n)]
    if not bns or not feeds:
        return student, []
    probe = onnx.ModelProto()
    probe.CopyFrom(student)
    existing = {o.name for o in probe.graph.output}
    for n in bns:
        if n.input[0] not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
    session = session_fn(probe.SerializeToString())
    names = [n.input[0] for n in bns]
    sums = {name: None for name in names}
    for feed in feeds:
        values = session.run(names, feed)
        for name, v in zip(names, values):
            v = np.asarray(v, np.float64)
            axes = tuple(i for i in range(v.ndim) if i != 1)
            part = (v.sum(axes), (v * v).sum(axes), v.size // v.shape[1])
            sums[name] = part if sums[name] is None else tuple(a + b for a, b in zip(sums[name], part))
    out = onnx.ModelProto()
    out.CopyFrom(student)
    by_name = {i.name: i for i in out.graph.initializer}
    changed = []
    for n in bns:
        s, sq, count = sums[n.input[0]]
        mean = s / count
        var = np.maximum(sq / count - mean * mean, 0.0)
        for index, value in ((3, mean), (4, var)):
            old = by_name[n.input[index]]
            dtype = numpy_helper.to_array(old).dtype
            old.CopyFrom(numpy_helper.from_array(value.astype(dtype).reshape(numpy_helper.to_array(old).shape), old.name))
        changed.append(n.name or n.output[0])
    return out, changed
