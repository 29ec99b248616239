"""Calibrated fixed-point formats: per-layer fractional bits from activation ranges."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from mfconvert.calibrate.activation_stats import activation_ranges, frac_bits_for, linear_inputs
from mfconvert.calibrate.data import Examples
from mfconvert.cli.main import app
from mfconvert.convert.torch_entry import export_onnx
from mfconvert.runtime import session


@pytest.mark.parametrize("act_bits", [8, 12, 16, 24])
def test_frac_bits_is_the_largest_without_saturation(act_bits):
    top = 2 ** (act_bits - 1) - 1
    for max_abs in [1e-3, 0.37, 1.0, 1.5, 7.99, 8.0, 300.0, 2.0 ** 20]:
        f = frac_bits_for(max_abs, act_bits)
        brute = max(g for g in range(-32, 33) if max_abs * 2.0 ** g <= top)
        assert f == brute, (max_abs, act_bits)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.tensor(load_digits().data[:200] * 4.0, dtype=torch.float32)     # pixel values 0..64
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))
    path = tmp_path_factory.mktemp("stats") / "mlp.onnx"
    export_onnx(net, (x[:2],), str(path), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    return str(path), x.numpy(), net


def test_ranges_are_the_maxima_of_the_activations(mlp):
    path, x, net = mlp
    model = onnx.load(path)
    inputs = linear_inputs(model)
    assert len(inputs) == 2 and inputs[0] == "x"
    ranges = activation_ranges(model, Examples([{"x": r} for r in x]), inputs)
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    hidden = np.tanh(x @ w1.T + b1)
    assert ranges["x"] == np.abs(x).max()
    assert ranges[inputs[1]] == pytest.approx(np.abs(hidden).max(), rel=1e-6)


def test_cli_calibrates_16_bit_activations_per_layer(mlp, tmp_path):
    path, x, _ = mlp
    data = tmp_path / "x.npz"
    np.savez(data, x=x)
    out_cal, out_fixed = tmp_path / "cal.onnx", tmp_path / "fixed.onnx"
    common = ["--act-bits", "16", "--no-add-attention", "--min-params", "0"]
    assert CliRunner().invoke(app, [path, "-o", str(out_cal), "--data", str(data), *common]).exit_code == 0
    assert CliRunner().invoke(app, [path, "-o", str(out_fixed), *common, "--act-frac-bits", "8"]).exit_code == 0
    fracs = [next(a.i for a in n.attribute if a.name == "act_frac_bits")
             for n in onnx.load(out_cal).graph.node if n.op_type == "ShiftLinear"]
    # |x| ≤ 64 → Q7.8; |tanh| just below 1 → F = 14 (F = 15 would saturate at 0.99999·2^15 > 2^15 − 1)
    assert fracs == [frac_bits_for(64.0, 16), frac_bits_for(0.99999, 16)] == [8, 14]
    ref = session(path).run(None, {"x": x})[0]
    err = {p: np.abs(session(str(p)).run(None, {"x": x})[0] - ref).mean() for p in (out_cal, out_fixed)}
    assert err[out_cal] < err[out_fixed]          # Q7.8 wastes 7 bits on the tanh outputs
