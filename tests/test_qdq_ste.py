"""Training through a QDQ model's fake quantisation: the executor passes the gradient of a
QuantizeLinear → DequantizeLinear pair straight through (STE), zero where the value was clipped,
and leaves the forward value unchanged. References: NumPy for the gradient, ONNX Runtime for the
forward value."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mfconvert.nn.onnx_module import OnnxModule


def _qdq_model(w, scale, zero, dq_scale=None, axis=None, opset=19):
    attrs = {} if axis is None else {"axis": axis}
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(zero, "z"),
             numpy_helper.from_array(scale if dq_scale is None else dq_scale, "s2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("QuantizeLinear", ["h", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s2", "z"], ["y"], **attrs)], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reference(x, w, scale, zero, dq_scale, lo, hi):
    """(y, dL/dw) for L = Σ y² with y = DQ(Q(x·w)), the STE rule: dy/dh = dq_scale/scale inside
    the integer range, 0 where clipped."""
    h = x.astype(np.float64) @ w.astype(np.float64)
    q = np.round(h / scale) + zero
    inside = (q >= lo) & (q <= hi)
    y = (np.clip(q, lo, hi) - zero) * dq_scale
    dh = 2 * y * inside * (dq_scale / scale)
    return y, x.T.astype(np.float64) @ dh


@pytest.mark.parametrize("dtype,zero_value,lo,hi", [(np.int8, 3, -128, 127), (np.uint8, 128, 0, 255)])
@pytest.mark.parametrize("per_axis", [False, True])
def test_gradient_is_straight_through_inside_the_range(dtype, zero_value, lo, hi, per_axis):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (16, 24)).astype(np.float32)
    w = rng.normal(0, 0.4, (24, 8)).astype(np.float32)
    # Scales so that about a quarter of the values clip: the STE's zero there is tested too.
    if per_axis:
        scale = np.linspace(0.01, 0.03, 8).astype(np.float32)
        zero = np.full(8, zero_value, dtype)
    else:
        scale, zero = np.float32(0.02), dtype(zero_value)
    model = _qdq_model(w, scale, zero, axis=1 if per_axis else None)
    module = OnnxModule(model)
    y = module(x=torch.from_numpy(x))[0]
    (y.double() ** 2).sum().backward()
    grad = next(p.grad for n, p in module.named_parameters() if p.shape == w.shape)
    ref_y, ref_grad = _reference(x, w, scale.astype(np.float64), zero.astype(np.float64), scale.astype(np.float64), lo, hi)
    clipped = ~((np.round(x.astype(np.float64) @ w / scale) + zero >= lo) & (np.round(x.astype(np.float64) @ w / scale) + zero <= hi))
    assert 0.05 < clipped.mean() < 0.6, clipped.mean()
    # The forward value is the quantised one (float32 products: a rounding tie may differ by one
    # step of the grid in at most a few places between float32 and float64 products).
    assert np.mean(np.abs(y.detach().numpy() - ref_y) > 1e-6) < 0.01
    # Gradient: float32 accumulation of ≤ 16 products of values ≤ ~10 against float64 (relative 1e-5).
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-4, atol=1e-4 * np.abs(ref_grad).max())


def test_forward_value_unchanged_and_equal_to_ort():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (32, 24)).astype(np.float32)
    w = rng.normal(0, 0.4, (24, 8)).astype(np.float32)
    model = _qdq_model(w, np.float32(0.02), np.int8(0))
    module = OnnxModule(model)
    trained_path = module(x=torch.from_numpy(x))[0]          # parameters require grad: the STE path
    with torch.no_grad():
        plain = module(x=torch.from_numpy(x))[0]
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert trained_path.requires_grad and not plain.requires_grad
    np.testing.assert_array_equal(trained_path.detach().numpy(), plain.numpy())
    # ORT's MLAS MatMul and torch's sum in other orders: a tie of the rounding may move one value
    # by one step of the grid (0.02); all others are equal.
    diff = np.abs(plain.numpy() - expected)
    assert np.mean(diff > 0) < 0.01 and diff.max() <= 0.02 + 1e-6


def test_different_dequantize_scale_scales_the_gradient():
    """DQ with another scale than Q's: y = q·s2, so dy/dh = s2/s inside the range."""
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (8, 12)).astype(np.float32)
    w = rng.normal(0, 0.3, (12, 4)).astype(np.float32)
    model = _qdq_model(w, np.float32(0.05), np.int8(0), dq_scale=np.float32(0.1))
    module = OnnxModule(model)
    (module(x=torch.from_numpy(x))[0].double() ** 2).sum().backward()
    grad = next(p.grad for n, p in module.named_parameters() if p.shape == w.shape)
    _, ref_grad = _reference(x, w, 0.05, 0.0, 0.1, -128, 127)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-4, atol=1e-4 * np.abs(ref_grad).max())
