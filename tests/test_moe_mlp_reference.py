"""The MoE MLP's three faces against tests/numpy_reference.moe_mlp, written from
docs/ops.md#shiftmoemlp alone (router initialised from the spec's formula, top-1 with ties to
Mult, gate = softmax probability, float Mult expert, Shift expert by the ShiftLinear spec): the
moe-mlp pass's graph run in ORT (with the ShiftLinear kernel) and mfconvert.nn.ShiftMoEMLP.
Routings: soft gates (router_std 1: most gates well below 1), ±100 logits, all to Shift."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.nn import ShiftMoEMLP
from mfconvert.runtime import session
from tests import numpy_reference as ref

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, HIDDEN, U = 24, 64, 2.0 ** -24
ROUTINGS = {
    "soft": dict(router_std=1.0, router_bias=0.0, seed=4),
    "mixed": dict(router_std=70.0, router_bias=0.0, seed=3),
    "all_shift": dict(router_std=0.0, router_bias=30.0),
}
ACTS = {"relu": (nn.ReLU(), lambda h: np.maximum(h, 0.0), 1.0),
        "gelu": (nn.GELU(), lambda h: 0.5 * h * (1 + erf(h / math.sqrt(2))), 1.13)}   # (torch, NumPy, Lipschitz)


@pytest.fixture(scope="module", params=list(ACTS))
def mlp(request, tmp_path_factory):
    torch.manual_seed(7)
    fc1, fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
    with torch.no_grad():      # rows of different scales: per-channel exponents differ (−3 … +1 apart)
        for fc in (fc1, fc2):
            fc.weight.mul_(torch.exp2(torch.randint(-3, 2, (fc.out_features, 1)).float()))
    path = tmp_path_factory.mktemp("moe_ref") / f"{request.param}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # TorchScript exporter deprecation notice
        torch.onnx.export(nn.Sequential(fc1, ACTS[request.param][0], fc2).eval(), (torch.randn(1, 3, D),), path,
                          dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    return request.param, fc1, fc2, path


def spec_router(cfg, d=D):
    """W_r = (router_std/√d)·N, N = default_rng(seed).standard_normal((2, d)); b_r = [0, bias]."""
    n = np.random.default_rng(cfg.get("seed", 0)).standard_normal((2, d))
    return (cfg["router_std"] / np.sqrt(d) * n).astype(np.float32), np.array([0, cfg["router_bias"]], np.float32)


def reference_and_bound(act_name, fc1, fc2, cfg, x):
    w1, b1 = fc1.weight.detach().numpy(), fc1.bias.detach().numpy()
    w2, b2 = fc2.weight.detach().numpy(), fc2.bias.detach().numpy()
    return block_reference(ACTS[act_name][1:], act_name == "relu", *spec_router(cfg), w1, b1, w2, b2, x)


def block_reference(act, exact_act, w_r, b_r, w1, b1, w2, b2, x):
    """(y float64 [R, d_out], per-element bound, info) for a float32 evaluation of the block;
    act = (NumPy activation, its Lipschitz constant), exact_act: float32 evaluates it exactly.

    Router: l = x·W_rᵀ + b_r in float32 is off by at most (d + 1)·U·(|x|·|W_r|ᵀ + |b_r|) per logit;
    tokens whose margin |l₁ − l₀| is within twice that may route either way (`ambiguous`).
    Gate: dg/d(l₁ − l₀) = g(1 − g), so err_g ≤ 2·g(1 − g)·err_l + 4U (float32 exp, sum, divide).
    Mult expert: each Linear sums n + 1 products (n inputs and the bias): ≤ (n + 1)·U·Σ|terms|;
    the activation is L-Lipschitz (ReLU 1, GELU 1.13) and its float32 evaluation within 8U·|h|.
    Shift expert: fc1 is exact (integer arithmetic on float32 inputs); ReLU keeps it exact; after
    GELU a fixed-point input floor(a·2¹⁶) of fc2 may flip by one where a·2¹⁶ lies within
    8U·|h|·2¹⁶ of an integer, moving acc_o by at most one per such input with a non-zero code,
    i.e. the output by 2^(e_o − 16) each. Output y = g·E: err ≤ |E|·err_g + g·err_E + U·|y|."""
    np_act, lip = act
    y, p = ref.moe_mlp(x, w_r, b_r, w1, b1, w2, b2, np_act)
    y = y.reshape(-1, w2.shape[0])
    x2 = p["x2"].astype(np.float64)
    d, hidden = w1.shape[1], w1.shape[0]
    err_l = (d + 1) * U * (np.abs(x2) @ np.abs(w_r.T.astype(np.float64)) + np.abs(b_r))
    margin = np.abs(p["logits"][:, 1] - p["logits"][:, 0])
    ambiguous = margin <= 2 * err_l.sum(1)
    g = p["gate"]
    err_g = 2 * g * (1 - g) * err_l.sum(1) + 4 * U
    h = p["h_mult"]
    err_h = (d + 1) * U * (np.abs(x2) @ np.abs(w1.T) + np.abs(b1))
    a = np_act(h)
    err_a = lip * err_h + (0 if exact_act else 8 * U * np.abs(h))
    err_mult = err_a @ np.abs(w2.T) + (hidden + 1) * U * (np.abs(a) @ np.abs(w2.T) + np.abs(b2))
    if exact_act:
        err_shift = np.zeros_like(err_mult)
    else:
        scaled = p["a_shift"] * 2.0 ** 16
        near = np.abs(scaled - np.round(scaled)) <= 8 * U * np.abs(p["h_shift"]) * 2.0 ** 16
        _, m2, e2 = p["fc2_codes"]
        nonzero = (m2 != 15).astype(np.float64)                      # 5-bit codes: m = Z = 15 is zero
        err_shift = (near.astype(np.float64) @ nonzero.T) * 2.0 ** (e2.astype(np.float64) - 16)
    err_e = np.where(p["expert"][:, None] == 1, err_shift, err_mult)
    tol = np.abs(p["chosen"]) * err_g[:, None] + g[:, None] * err_e + U * np.abs(y)
    return y, tol, dict(p, ambiguous=ambiguous, margin=margin)


def check(got, y, tol, info, act_name, routing):
    got = got.reshape(y.shape).astype(np.float64)
    ok = ~info["ambiguous"]
    assert ok.mean() > 0.95, ok.mean()                   # measured: no ambiguous token in these fixtures
    diff = np.abs(got - y)[ok]
    assert (diff <= tol[ok]).all(), f"max |diff| {diff.max():.3g}, max diff/bound {(diff / tol[ok]).max():.3g}"
    if act_name == "relu":
        # All-integer Shift expert with a gate that is exactly 1.0f (margin > 17.3: exp(−margin)
        # < 2⁻²⁵): the output is the reference's float32 value bit for bit.
        exact = ok & (info["expert"] == 1) & (info["margin"] > 18)
        assert routing == "soft" or exact.sum() > 0
        np.testing.assert_array_equal(got[exact], info["e_shift"][exact].astype(np.float32))


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_pass_graph_and_layer_match_numpy_reference(mlp, routing):
    act_name, fc1, fc2, path = mlp
    cfg = ROUTINGS[routing]
    x = (torch.randn(3, 40, D, generator=torch.Generator().manual_seed(8)) * 1.5).numpy()
    y, tol, info = reference_and_bound(act_name, fc1, fc2, cfg, x)
    g, shift = info["gate"], info["expert"].mean()
    # The fixtures are what their names say.
    assert {"soft": np.mean(g < 0.9) > 0.7 and 0.2 < shift < 0.8,
            "mixed": 0.3 < shift < 0.7 and np.mean(g > 0.999) > 0.9, "all_shift": shift == 1.0}[routing], (g, shift)

    # Measured (max |diff| / bound): 0.22–0.50 (ReLU, and GELU with mixed gates); with GELU and
    # all-Shift routing 0.99, where one fc2 input flips by one LSB (the bound allows that step).
    # No token is ambiguous; soft routing: 76 % of gates below 0.9, mean 0.77, 44 % to Shift.
    converted = convert_onnx(str(path), ConvertConfig(shift_linear=None, add_attention=None,
                                                      moe_mlp=MoEMLPConfig(**cfg))).model
    got_ort = session(converted.SerializeToString(), threads=1).run(None, {"x": x})[0]
    check(got_ort, y, tol, info, act_name, routing)

    layer = ShiftMoEMLP.from_mlp(fc1, ACTS[act_name][0], fc2, **cfg).eval()
    with torch.no_grad():
        got_layer = layer(torch.from_numpy(x)).numpy()
        # The router the layer builds is the spec's, and its Shift fc1 is the spec's integer op.
        w_r, b_r = spec_router(cfg)
        np.testing.assert_array_equal(layer.router.weight.numpy(), w_r)
        np.testing.assert_array_equal(layer.router.bias.numpy(), b_r)
        h_shift = layer.experts[1][0](torch.from_numpy(info["x2"])).numpy()
    np.testing.assert_array_equal(h_shift, info["h_shift"])
    check(got_layer, y, tol, info, act_name, routing)
