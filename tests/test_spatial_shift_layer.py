"""The SpatialShift layer (nn/spatial_shift.py): in eval mode the NumPy reference bit for bit;
in training the bilinear sampling of Active Shift (a half-pixel offset is the mean of the two
integer shifts; gradients against finite differences), the straight-through rounding (forward =
the rounded offsets, gradient = the bilinear one at them), the Sparse Shift L1 term added to the
offsets' gradient; and `finetune` (what `mfconvert finetune` runs) training a converted model
through the registry entry, exported with integer offsets that run in ONNX Runtime."""
import numpy as np
import pytest
import torch

from mfconvert.nn.spatial_shift import SpatialShift
from tests import numpy_reference as ref


@pytest.mark.parametrize("strides, padding, channel_shift", [((1, 1), "zeros", 0), ((2, 2), "edge", 2),
                                                              ((1, 3), "zeros", -1)])
def test_eval_is_the_reference(strides, padding, channel_shift):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 7, 9)).astype(np.float32)
    offsets = rng.integers(-3, 4, size=(6, 2))
    layer = SpatialShift(6, offsets + rng.uniform(-0.4, 0.4, size=(6, 2)), strides, padding, channel_shift).eval()
    got = layer(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref.spatial_shift(x, offsets, strides, padding, channel_shift))
    assert np.array_equal(layer.integer_offsets(), offsets)


def test_active_shift_is_bilinear_with_finite_difference_gradients():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(1, 3, 6, 6))).double()
    layer = SpatialShift(3, [[0.5, 0.0], [0.0, -1.5], [0.25, 0.75]], mode="active").double().train()
    y = layer(x).detach().numpy()
    xn = x.numpy()
    mean = lambda c, a, b: (ref.spatial_shift(xn, np.array([a] * 3), (1, 1))[:, c]
                            + ref.spatial_shift(xn, np.array([b] * 3), (1, 1))[:, c]) / 2
    # the reference writes float32: its rounding (≤ 2^-24 relative on |x| < 5) bounds the difference
    np.testing.assert_allclose(y[:, 0], mean(0, [0, 0], [1, 0]), atol=1e-6)
    np.testing.assert_allclose(y[:, 1], mean(1, [0, -2], [0, -1]), atol=1e-6)
    # gradients away from integer offsets (where floor has a kink)
    layer = SpatialShift(3, [[0.5, 0.3], [0.2, -1.5], [0.25, 0.75]], mode="active").double().train()
    weights = torch.from_numpy(rng.normal(size=y.shape))
    (layer(x) * weights).sum().backward()
    grad, start = layer.offset_p.grad.numpy().copy(), layer.offset_p.detach().clone()
    eps = 1e-6
    for c in range(3):
        for k in range(2):
            f = []
            for sign in (1, -1):
                p = start.clone()
                p[c, k] += sign * eps
                with torch.no_grad():
                    layer.offset_p.copy_(p)
                    f.append(float((layer(x) * weights).sum()))
            assert grad[c, k] == pytest.approx((f[0] - f[1]) / (2 * eps), rel=1e-5, abs=1e-6)


def test_ste_forward_is_rounded_and_sparsity_adds_l1():
    x = torch.randn(2, 2, 5, 5)
    layer = SpatialShift(2, [[0.4, -0.6], [1.2, 0.0]], mode="ste", sparsity=0.3).train()
    y = layer(x)
    want = ref.spatial_shift(x.numpy(), np.array([[0, -1], [1, 0]]), (1, 1))
    np.testing.assert_array_equal(y.detach().numpy(), want)
    y.sum().backward()
    plain = SpatialShift(2, [[0.4, -0.6], [1.2, 0.0]], mode="ste").train()
    plain(x).sum().backward()
    sign = torch.sign(plain.offset_p.detach())
    torch.testing.assert_close(layer.offset_p.grad, plain.offset_p.grad + 0.3 * sign)
    # the gradient is the bilinear one at the rounded point: S(k + 1) − S(k), summed
    fwd = ref.spatial_shift(x.numpy(), np.array([[1, -1], [1, 0]]), (1, 1)).sum((0, 2, 3)) - want.sum((0, 2, 3))
    assert float(plain.offset_p.grad[0, 0]) == pytest.approx(100.0 * fwd[0], rel=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="padding"):
        SpatialShift(2, padding="reflect")
    with pytest.raises(ValueError, match=r"offsets must have shape \[2, 2\]"):
        SpatialShift(2, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"expects \[N, 2, H, W\]"):
        SpatialShift(2)(torch.zeros(1, 3, 4, 4))
