"""mfconvert.nn.ShiftMoEMLP in eval mode computes what the moe-mlp pass's ORT graph computes:
same routing, the Mult expert to float32 rounding, the Shift expert bit for bit (ReLU; for GELU
and SiLU up to the rare one-LSB flips that the exporters' and torch's different erf/tanh/sigmoid
roundings cause in the fixed-point input of fc2)."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.moe import routing_split, split_table
from mfconvert.nn import ShiftMoEMLP
from mfconvert.runtime import session

D, HIDDEN = 48, 192
ROUTINGS = {   # router config forcing each routing; "mixed": |logit difference| ~ 100, no ties
    "all_mult": dict(router_std=0.0, router_bias=-30.0),
    "all_shift": dict(router_std=0.0, router_bias=30.0),
    "mixed": dict(router_std=70.0, router_bias=0.0, seed=3),
}
ACTS = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}


def export(mlp, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # TorchScript exporter deprecation notice
        torch.onnx.export(mlp, (torch.randn(1, 3, D),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})


@pytest.fixture(scope="module", params=list(ACTS))
def mlp(request, tmp_path_factory):
    torch.manual_seed(1)
    fc1, act, fc2 = nn.Linear(D, HIDDEN), ACTS[request.param], nn.Linear(HIDDEN, D)
    path = tmp_path_factory.mktemp("moe") / f"{request.param}.onnx"
    export(nn.Sequential(fc1, act, fc2).eval(), path)
    return request.param, (fc1, act, fc2), path


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_layer_matches_ort_graph(mlp, routing):
    act_name, (fc1, act, fc2), path = mlp
    cfg = ROUTINGS[routing]
    converted = convert_onnx(str(path), ConvertConfig(shift_linear=None, add_attention=None, moe_mlp=MoEMLPConfig(**cfg))).model
    layer = ShiftMoEMLP.from_mlp(fc1, act, fc2, **cfg).eval()
    x = torch.randn(3, 41, D, generator=torch.Generator().manual_seed(2)) * 2

    got = session(converted.SerializeToString(), threads=1).run(None, {"x": x.numpy()})[0].reshape(-1, D)
    with torch.no_grad():
        expect = layer(x).reshape(-1, D).numpy()
        probs, expert = layer.route(x.reshape(-1, D))
    gate_is_one = probs.max(1).values.numpy() == 1.0
    split = routing_split(converted, {"x": x.numpy()})["/0/MatMul"]
    assert (split.mult, split.shift) == layer.last_split
    assert {"all_mult": split.shift == 0, "all_shift": split.mult == 0,
            "mixed": 0.3 < split.shift_fraction < 0.7}[routing], split_table({"/0/MatMul": split})

    mult, shift = (expert == 0).numpy(), (expert == 1).numpy()
    np.testing.assert_allclose(got[mult], expect[mult], rtol=1e-5, atol=1e-6)
    if act_name == "relu":
        exact = shift & gate_is_one
        np.testing.assert_array_equal(got[exact], expect[exact])
        np.testing.assert_array_max_ulp(got[shift & ~gate_is_one], expect[shift & ~gate_is_one], maxulp=2)
    else:
        # A one-LSB flip of fc2's fixed-point input (1 ulp apart before floor(a·2^16)) moves an
        # output by at most one step 2^(e_o - 16); measured: ≤ 2 steps, in ~15 % of the outputs
        # (each sums 192 inputs), the rest bit-exact.
        step = 2.0 ** (layer.experts[1][2].exponent.numpy().astype(np.float64) - 16)
        steps = np.abs(got[shift] - expect[shift]) / step
        assert steps.max(initial=0) <= 4 and (steps > 0).sum() <= 0.3 * steps.size


def test_zero_tokens_and_rank4_input():
    torch.manual_seed(0)
    layer = ShiftMoEMLP.from_mlp(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D)).eval()
    assert layer(torch.zeros(2, 0, 5, D)).shape == (2, 0, 5, D)
    assert layer(torch.randn(2, 3, 5, D)).shape == (2, 3, 5, D) and sum(layer.last_split) == 30
