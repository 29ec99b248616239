"""mfconvert.nn.ShiftConv against NumPy: the integer forward is the ShiftLinear arithmetic of the spec
(tests/numpy_reference.py) on im2col rows gathered here by plain loops, bit for bit; training mode
emulates it; codes round-trip through onnx_constants."""
import numpy as np
import pytest
import torch

from mfconvert.nn import pow2
from mfconvert.nn.shift_conv import ShiftConv, unpack_conv_codes
from tests import numpy_reference as ref


def im2col_loops(x: np.ndarray, kernel, strides, pads, dilations, group: int) -> np.ndarray:
    """[group, N·positions, C/g·prod(k)] of x [N, C, spatial…], by loops over output positions and
    taps (a tap in the padding reads 0), channels-then-taps within a row (the weight's layout)."""
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    dims = len(kernel)
    outs = [(sizes[i] + pads[i] + pads[dims + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
            for i in range(dims)]
    taps = list(np.ndindex(*kernel))
    positions = list(np.ndindex(*outs))
    cg = c // group
    rows = np.zeros((n, len(positions), c, len(taps)), np.float32)
    for p, pos in enumerate(positions):
        for t, tap in enumerate(taps):
            src = [pos[i] * strides[i] - pads[i] + tap[i] * dilations[i] for i in range(dims)]
            if all(0 <= src[i] < sizes[i] for i in range(dims)):
                rows[:, p, :, t] = x[(slice(None), slice(None), *src)]
    # [N, P, C, taps] → [group, N·P, C/g·taps]: channels of group g, each with its taps
    rows = rows.reshape(n * len(positions), group, cg * len(taps)).transpose(1, 0, 2)
    return rows, outs


def reference_conv(x, layer: ShiftConv) -> np.ndarray:
    """The ShiftConv op per the spec: ShiftLinear (NumPy reference) on each group's im2col rows,
    the terms' codes side by side (Σ over terms and taps is one sum)."""
    codes = layer.codes().numpy().astype(np.int64).reshape(layer.terms, layer.out_channels, layer.in_features)
    bits, z = layer.weight_bits, pow2.zero_shift(layer.weight_bits)
    rows, outs = im2col_loops(x, layer.kernel_shape, layer.strides, layer.pads, layer.dilations, layer.group)
    mg = layer.out_channels // layer.group
    e = layer.exponent.numpy()
    b = None if layer.bias is None else layer.bias.detach().numpy()
    ys = []
    for g in range(layer.group):
        c = codes[:, g * mg:(g + 1) * mg]                                 # [T, Mg, K]
        sign = np.concatenate(list(c >> (bits - 1)), axis=1)
        m = np.concatenate(list(c & z), axis=1)
        xs = np.tile(rows[g], (1, layer.terms))
        ys.append(ref.shift_linear(xs, sign, m, e[g * mg:(g + 1) * mg], None if b is None else b[g * mg:(g + 1) * mg],
                                   bits, layer.act_bits, layer.act_frac_bits))
    y = np.concatenate(ys, axis=1)                                        # [N·P, M]
    return y.reshape(x.shape[0], *outs, layer.out_channels).transpose(0, len(outs) + 1, *range(1, len(outs) + 1))


CASES = {   # in, out, kernel, strides, pads, dilations, group, input spatial
    "3x3": (4, 6, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1, [7, 6]),
    "3x3-s2-asym": (3, 5, [3, 3], [2, 2], [0, 1, 1, 0], [1, 1], 1, [9, 8]),
    "depthwise-s2": (6, 6, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], 6, [8, 8]),
    "group2-dil2": (4, 6, [3, 2], [1, 1], [2, 0, 2, 1], [2, 1], 2, [7, 7]),
    "pointwise": (8, 5, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1, [5, 3]),
    "1d-s2-dil2": (4, 8, [5], [2], [2, 1], [2], 2, [17]),
    "1d-depthwise": (5, 5, [3], [1], [1, 1], [1], 5, [11]),
}


@pytest.mark.parametrize("terms", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_forward_matches_numpy_reference(case, terms):
    c, m, k, s, p, d, g, size = CASES[case]
    torch.manual_seed(len(case) + terms)
    layer = ShiftConv(c, m, k, s, p, d, g, bias=case != "pointwise", terms=terms, weight_bits=4 if terms == 2 else 5,
                      act_frac_bits=12).eval()
    x = torch.randn(2, c, *size) * 3
    x[0, 0].view(-1)[:3] = torch.tensor([1e9, -1e9, float("nan")])   # saturating and NaN inputs
    y = layer(x).numpy()
    np.testing.assert_array_equal(y, reference_conv(x.numpy(), layer))


def test_accumulator_wraps_like_int32():
    layer = ShiftConv(4, 2, [3, 3], pads=[1, 1, 1, 1], bias=False, act_frac_bits=24).eval()
    layer.load_float_weight(torch.full((2, 36), 1.0))
    x = torch.full((1, 4, 4, 4), 100.0)   # 36 taps × 100·2^24 > 2^31: wraps
    np.testing.assert_array_equal(layer(x).numpy(), reference_conv(x.numpy(), layer))
    assert float(layer(x)[0, 0, 1, 1]) != 36 * 100.0   # an interior output: the sum wrapped


@pytest.mark.parametrize("case", ["3x3-s2-asym", "depthwise-s2", "1d-s2-dil2"])
def test_training_mode_emulates_integer_mode(case):
    """The float emulation differs from the integer result only by float32 summation order:
    |Δ| ≤ (taps·C/g) · 2^−23 · Σ|terms| per output, bounded here by 1e-4 relative to the peak."""
    c, m, k, s, p, d, g, size = CASES[case]
    torch.manual_seed(0)
    layer = ShiftConv(c, m, k, s, p, d, g, terms=2)
    x = torch.randn(3, c, *size)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-4 * float(y_eval.abs().max()), rtol=0)
    loss = y_train.square().sum()
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_from_conv_and_codes_round_trip():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
    layer = ShiftConv.from_conv(conv, terms=2).eval()
    x = torch.randn(2, 6, 9, 9)
    # close to the float conv: two-term codes hold each weight to a few % (greedy residual)
    y, y_float = layer(x), conv(x).detach()
    assert float((y - y_float).norm() / y_float.norm()) < 0.05
    packed, exponent, bias = layer.onnx_constants()
    codes = unpack_conv_codes(packed, 8, layer.in_features, 2, layer.weight_bits)
    again = ShiftConv.from_codes(codes, torch.from_numpy(exponent), torch.from_numpy(bias), in_channels=6,
                                 kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=2).eval()
    np.testing.assert_array_equal(again(x).numpy(), y.numpy())
    assert torch.equal(again.codes(), layer.codes())


def test_fused_activation_after_bias():
    torch.manual_seed(2)
    relu6 = ShiftConv(3, 4, [3, 3], pads=[1, 1, 1, 1], activation="Clip", clip_min=0.0, clip_max=6.0).eval()
    plain = ShiftConv(3, 4, [3, 3], pads=[1, 1, 1, 1]).eval()
    plain.load_float_weight(relu6.float_weight(), relu6.bias, relu6.exponent)
    x = torch.randn(1, 3, 6, 6) * 10
    np.testing.assert_array_equal(relu6(x).numpy(), plain(x).clamp(0, 6).numpy())


@pytest.mark.parametrize("bad", [dict(group=4), dict(kernel_shape=[1, 1, 1]), dict(pads=[1, 1]),
                                 dict(activation="Tanh")])
def test_bad_arguments_are_refused(bad):
    args = dict(in_channels=6, out_channels=6, kernel_shape=[3, 3], pads=[0, 0, 0, 0], group=3) | bad
    with pytest.raises(ValueError):
        ShiftConv(**args)


@pytest.mark.parametrize("terms,activation", [(1, ""), (3, "Relu"), (2, "Clip")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_forward_matches_spec_reference(case, terms, activation):
    """Against D's ShiftConv reference (tests/numpy_reference.shift_conv, written from docs/ops.md)."""
    c, m, k, s, p, d, g, size = CASES[case]
    torch.manual_seed(7 * terms + len(case))
    clip = dict(clip_min=-0.5, clip_max=1.5) if activation == "Clip" else {}
    layer = ShiftConv(c, m, k, s, p, d, g, terms=terms, activation=activation, act_frac_bits=14, **clip).eval()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, c, *size) * 2
    codes = layer.codes().numpy().reshape(terms, m, c // g, *k)
    expect = ref.shift_conv(x.numpy(), codes, layer.exponent.numpy(), layer.bias.detach().numpy(), layer.weight_bits,
                            layer.act_bits, layer.act_frac_bits, k, s, p, d, g, activation, **clip)
    np.testing.assert_array_equal(layer(x).numpy(), expect)
