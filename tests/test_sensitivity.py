"""--max-drop: per-layer sensitivities are measured one layer at a time and the most sensitive
layers stay float until the model's error fits the budget."""
import numpy as np
import onnx
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.evaluate import model_outputs
from mfconvert.calibrate.sensitivity import convert_within_budget, drop
from mfconvert.cli.main import app
from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.convert.torch_entry import export_onnx

CONFIG = ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=2, min_params=0))   # ternary: lossy


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.tensor(load_digits().data[:300] / 16.0, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh(),
                              torch.nn.Linear(96, 32))
    path = tmp_path_factory.mktemp("sens") / "mlp.onnx"
    export_onnx(net, (x[:2],), str(path), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    return str(path), Examples([{"x": r} for r in x.numpy()])


def test_sensitivities_are_single_layer_errors_and_the_budget_holds(mlp):
    path, examples = mlp
    ref = model_outputs(path, examples)
    full = drop(ref, model_outputs(convert_onnx(path, CONFIG).model, examples), logits=False)
    budget = full / 3
    result = convert_within_budget(path, CONFIG, examples, max_drop=budget)
    assert len(result.sensitivities) == 3
    for s in result.sensitivities:          # each figure is the error of converting that layer alone
        only = ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=2, min_params=0, include=[f"^{s.node}$"]))
        alone = drop(ref, model_outputs(convert_onnx(path, only).model, examples), logits=False)
        assert s.error == pytest.approx(alone, rel=1e-9)
    assert [s.error for s in result.sensitivities] == sorted((s.error for s in result.sensitivities), reverse=True)
    assert result.error <= budget < full
    kept = result.kept_float
    assert kept == result.sensitivities[:len(kept)] and 0 < len(kept) < 3
    ops = [n.op_type for n in result.result.model.graph.node]
    assert ops.count("ShiftLinear") == 3 - len(kept)
    assert result.error == pytest.approx(drop(ref, model_outputs(result.result.model, examples), logits=False))


def test_cli_max_drop_reports_kept_layers(mlp, tmp_path):
    path, examples = mlp
    data = tmp_path / "x.npz"
    np.savez(data, x=np.stack([e["x"] for e in examples.items]))
    out = tmp_path / "budget.onnx"
    res = CliRunner().invoke(app, [path, "-o", str(out), "--weight-bits", "2", "--min-params", "0",
                                   "--no-add-attention", "--data", str(data), "--max-drop", "0.0001"])
    assert res.exit_code == 0, res.output
    assert "--max-drop: measured drop" in res.output and "kept float:" in res.output
    assert onnx.load(out)
    res = CliRunner().invoke(app, [path, "--dry-run", "--data", str(data), "--rounding", "nearest"])
    assert res.exit_code == 1 and "--data with --rounding nearest is for" in res.output


def _two_class(w, b):
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["p"], axis=-1)], "two_class",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nsr_measure_counts_the_logits_behind_a_softmax():
    """A confident two-class model (open_nsfw's p ≈ (1, 0)): the probabilities' ½·NSR hides an
    error that the logits show; the allocation's measure takes the larger (NumPy reference)."""
    from mfconvert.calibrate.sensitivity import Measurer, nsr_drop
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (16, 2)).astype(np.float32)
    b = np.array([6.0, -6.0], np.float32)
    noisy = (w + rng.normal(0, 0.05, w.shape)).astype(np.float32)
    xs = rng.normal(0, 1, (32, 16)).astype(np.float32)
    examples = Examples([{"x": x} for x in xs])

    def numpy_model(weights):
        logits = xs.astype(np.float64) @ weights + b
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return logits, e / e.sum(-1, keepdims=True)

    (l0, p0), (l1, p1) = numpy_model(w), numpy_model(noisy)
    half_nsr = lambda a, c: 0.5 * np.sum((a - c) ** 2) / np.sum(a ** 2)  # noqa: E731
    assert half_nsr(l0, l1) > 20 * half_nsr(p0, p1)   # the case the rule is for
    measurer = Measurer(_two_class(w, b), examples, metric="nsr")
    got = measurer.drop(_two_class(noisy, b))
    # float32 ORT against float64 NumPy: relative 1e-4 on an error of ~1e-3.
    assert got == pytest.approx(max(half_nsr(l0, l1), half_nsr(p0, p1)), rel=1e-4)
    # The plain outputs' measure alone is the probabilities' (what the allocation used before).
    reference, test = model_outputs(_two_class(w, b), examples), model_outputs(_two_class(noisy, b), examples)
    assert nsr_drop(reference, test) == pytest.approx(half_nsr(p0, p1), rel=1e-3)
    # The cosine measure (--max-drop) is unchanged by the rule.
    assert Measurer(_two_class(w, b), examples).drop(_two_class(noisy, b)) == pytest.approx(
        drop(reference, test, False))
