"""mfconvert.nn.AdderConv: eval forward bit for bit against the NumPy reference of docs/ops.md
(tests/numpy_reference.py: adder_conv) and the C++ kernel in ORT; the training gradients against
AdderNet's closed forms (eq. 5, 6 and 11 of the paper — not against finite differences, which
give the true gradient sign(·) that AdderNet replaces on purpose); AdderLinear as the 1×1 case."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from mfconvert.nn.adder_conv import ETA, AdderConv, AdderLinear
from mfconvert.ort_ops import DOMAIN
from mfconvert.runtime import session
from tests import numpy_reference as ref

CASES = {   # name: (AdderConv kwargs, input shape)
    "3x3": (dict(in_channels=3, out_channels=5, kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (2, 3, 6, 7)),
    "stride2_asym_pads": (dict(in_channels=4, out_channels=6, kernel_shape=[3, 2], strides=[2, 1],
                               pads=[1, 0, 0, 1]), (2, 4, 9, 6)),
    "groups_dilated": (dict(in_channels=6, out_channels=4, kernel_shape=[3, 3], dilations=[2, 1], group=2,
                            pads=[2, 1, 2, 1]), (1, 6, 8, 8)),
    "depthwise_relu": (dict(in_channels=5, out_channels=5, kernel_shape=[3, 3], group=5, pads=[1, 1, 1, 1],
                            activation="Relu"), (2, 5, 5, 5)),
    "1d_q8.8_clip": (dict(in_channels=3, out_channels=4, kernel_shape=[5], strides=[2], pads=[2, 1], act_bits=16,
                          act_frac_bits=8, activation="Clip", clip_min=-40.0, clip_max=-2.0), (3, 3, 17)),
}


def make(name: str, bias: bool = True, seed: int = 0):
    kwargs, shape = CASES[name]
    torch.manual_seed(seed)
    layer = AdderConv(bias=bias, **kwargs).eval()
    if bias:
        with torch.no_grad():
            layer.bias.uniform_(-3.0, 30.0)
    x = (np.random.default_rng(seed).standard_normal(shape) * 1.5).astype(np.float32)
    return layer, x


def reference(layer: AdderConv, x: np.ndarray) -> np.ndarray:
    return ref.adder_conv(x, layer.weight.detach().numpy(), None if layer.bias is None else layer.bias.detach().numpy(),
                          layer.act_bits, layer.act_frac_bits, layer.kernel_shape, layer.strides, layer.pads,
                          layer.dilations, layer.group, layer.activation, layer.clip_min, layer.clip_max)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_eval_forward_matches_numpy_reference_bit_for_bit(name, bias):
    layer, x = make(name, bias)
    got = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, reference(layer, x))


def test_large_and_saturating_values_match_reference():
    """Inputs and weights beyond Q16.16 saturate (sat_A), NaN inputs quantise to 0; distances near
    2^32 per tap make float32(acc) round (to nearest even)."""
    layer, x = make("3x3")
    x[0, 0, 0, :3] = [1e6, -1e6, np.nan]
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = 40000.0
        layer.weight[1] *= 3001.0
    np.testing.assert_array_equal(layer(torch.from_numpy(x)).numpy(), reference(layer, x))


@pytest.mark.parametrize("name", ["stride2_asym_pads", "groups_dilated", "1d_q8.8_clip"])
def test_eval_forward_matches_the_kernel_in_ort(name):
    layer, x = make(name)
    attrs = layer.onnx_attributes()
    node = helper.make_node("AdderConv", ["X", "W", "B"], ["Y"], domain=DOMAIN, name="adder", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [helper.make_tensor("W", TensorProto.FLOAT, list(layer.weight.shape), layer.weight.detach().numpy().ravel()),
         helper.make_tensor("B", TensorProto.FLOAT, [layer.out_channels], layer.bias.detach().numpy())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    (got,) = session(model.SerializeToString()).run(None, {"X": x})
    np.testing.assert_array_equal(layer(torch.from_numpy(x)).numpy(), got)


def _on_grid(t: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    """Values the fixed point holds exactly, so the STE's rounding is the identity here."""
    return torch.round(t * 2 ** 8) / 2 ** 8


@pytest.mark.parametrize("name", ["3x3", "groups_dilated", "1d_q8.8_clip"])
def test_training_gradients_are_addernets_closed_forms(name):
    """∂L/∂W = η·√k·G/‖G‖₂ with G[m, j] = Σ_r (x_rj − w_mj)·g_rm (eq. 5 and 11), and
    ∂L/∂X = col2im of Σ_m HardTanh(w_mj − x_rj)·g_rm (eq. 6), r over im2col rows, j over taps."""
    layer, x = make(name, bias=True, seed=1)
    layer.activation = ""            # the activation's own gradient is torch's; test the adder's
    layer.train()
    with torch.no_grad():
        layer.weight.copy_(_on_grid(layer.weight))
    xt = _on_grid(torch.from_numpy(x)).requires_grad_(True)
    y = layer(xt)
    g_out = torch.randn_like(y)
    (y * g_out).sum().backward()

    # Independent statement: im2col with F.unfold (2-D view), the formulas as written in the paper.
    k, s, p, d = layer.kernel_shape, layer.strides, layer.pads, layer.dilations
    xv = xt.detach()
    if len(k) == 1:
        xv, k, s, d, p = xv.unsqueeze(2), [1, *k], [1, *s], [1, *d], [0, p[0], 0, p[1]]
    padded = F.pad(xv, [p[1], p[3], p[0], p[2]])
    cols = F.unfold(padded, k, dilation=d, stride=s)                              # [N, C·K, L]
    n, _, length = cols.shape
    gsz, mg = layer.group, layer.out_channels // layer.group
    cols = cols.reshape(n, gsz, -1, length).permute(1, 0, 3, 2).reshape(gsz, n * length, -1).double()
    w = layer.weight.detach().reshape(gsz, mg, -1).double()
    go = g_out.reshape(n, gsz, mg, length).permute(1, 0, 3, 2).reshape(gsz, n * length, mg).double()
    diff = cols.unsqueeze(2) - w.unsqueeze(1)                                      # x − w: [g, r, m, j]
    grad_w = (diff * go.unsqueeze(3)).sum(1)
    grad_w = grad_w * ETA * math.sqrt(grad_w.numel()) / grad_w.norm()
    torch.testing.assert_close(layer.weight.grad.double(), grad_w.reshape(layer.weight.shape), rtol=1e-5, atol=1e-6)
    grad_cols = ((-diff).clamp(-1, 1) * go.unsqueeze(3)).sum(2)                     # [g, r, j]
    grad_cols = grad_cols.reshape(gsz, n, length, -1).permute(1, 0, 3, 2).reshape(n, -1, length)
    grad_x = F.fold(grad_cols.float(), padded.shape[2:], k, dilation=d, stride=s)
    grad_x = grad_x[:, :, p[0]:padded.shape[2] - p[2], p[1]:padded.shape[3] - p[3]]
    torch.testing.assert_close(xt.grad, grad_x.reshape(xt.shape), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.norm().item() == pytest.approx(ETA * math.sqrt(layer.weight.numel()), rel=1e-5)


def test_training_forward_is_the_integer_forward_in_float():
    """On inputs the fixed point holds, the float training forward gives the eval numbers (up to
    float32 summation order)."""
    layer, x = make("groups_dilated")
    xt = _on_grid(torch.from_numpy(x))
    with torch.no_grad():
        layer.weight.copy_(_on_grid(layer.weight))
        exact = layer.eval()(xt)
        trained = layer.train()(xt)
    torch.testing.assert_close(trained, exact, rtol=1e-6, atol=1e-4)


def test_adder_linear_is_the_1x1_adder_conv():
    torch.manual_seed(2)
    linear = AdderLinear(7, 3).eval()
    x = torch.randn(2, 4, 7)
    conv = AdderConv(7, 3, [1, 1]).eval()
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(3, 7, 1, 1))
        conv.bias.copy_(linear.bias)
    expected = conv(x.reshape(8, 7, 1, 1)).reshape(2, 4, 3)
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=0)
    assert linear(x).shape == (2, 4, 3)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="group 4 must divide"):
        AdderConv(6, 4, [3, 3], group=4)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        AdderConv(2, 2, [3, 3, 3])
    with pytest.raises(ValueError, match="activation"):
        AdderConv(2, 2, [3], activation="Sigmoid")
    with pytest.raises(ValueError, match="expects"):
        AdderConv(2, 2, [3]).eval()(torch.zeros(1, 3, 8))
