"""Passes adder-conv and shift-add-conv on small CNNs exported from PyTorch, run in ONNX Runtime with
our kernels: what they convert and skip (with reasons), the data-free BatchNormalization against
the conv's output statistics, the exact start of shift-add (the pair computes the shift conv of W
through a ±1 mixing matrix), calibrate_adders with data, and finetuning with AdderNet's optimiser
and --freeze-shift."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.passes.adder_conv import (AdderConvConfig, ShiftAddConvConfig, calibrate_adders, sign_matrix,
                                         sylvester)
from mfconvert.runtime import session


class SmallCNN(nn.Module):
    """A 1-channel stem, a BN after the second conv (folded by the match), a grouped conv, a 1-D-free
    tail: Conv/ReLU/MaxPool like LeNet."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.head = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.head(torch.relu(self.conv3(x)).flatten(1))


def export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), buf, input_names=["x"], output_names=["y"], dynamo=False,
                          opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    module = SmallCNN()
    with torch.no_grad():
        module.bn2.running_mean.uniform_(-0.2, 0.2)
        module.bn2.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 12, 12)
    return module.eval(), export(module, x)


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    if outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    return session(model.SerializeToString()).run(None, {"x": x})


def test_adder_conv_converts_all_but_the_stem_and_runs_in_ort(cnn):
    module, model = cnn
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, adder_conv=AdderConvConfig()))
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("AdderConv") == 2 and ops.count("BatchNormalization") == 2 and ops.count("Conv") == 1
    changes = {c.node: c for c in result.report.changes}
    assert len(changes) == 2 and all(c.new_op == "AdderConv" for c in changes.values())
    assert any("BatchNormalization" in c.detail for c in changes.values())   # conv2's BN folded into the match
    (skip,) = result.report.skips
    assert "first conv stays" in skip.reason
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32)
    (y,) = run(result.model, x)
    assert y.shape == (3, 10) and np.isfinite(y).all()
    everything = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                                   adder_conv=AdderConvConfig(first=True, exclude=["conv3"])))
    assert [c.node for c in everything.report.changes] == ["/stem/Conv", "/conv2/Conv"]
    assert "excluded by --exclude" in everything.report.skips[0].reason


def test_adder_passes_run_before_shift_conv_and_take_the_convs():
    """registry.ORDER is run order: with shift-conv on too, the adder passes convert the convs
    and shift-conv gets only what they leave (the stem)."""
    from mfconvert.passes import PASSES
    from mfconvert.passes.conv import ShiftConvConfig

    order = list(PASSES)
    assert order.index("adder-conv") < order.index("shift-conv") and order.index("shift-add-conv") < order.index("shift-conv")
    torch.manual_seed(1)
    model = export(SmallCNN(), torch.randn(1, 1, 12, 12))
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=ShiftConvConfig(),
                                               adder_conv=AdderConvConfig()))
    assert sorted(c.new_op for c in result.report.changes) == ["AdderConv", "AdderConv", "ShiftConv"]


def test_data_free_batchnorm_matches_the_convs_output_statistics(cnn):
    """On inputs drawn as the data-free start assumes (independent N(0, 1) per input element), the
    inserted BatchNormalization's output has the conv's per-channel mean and variance."""
    module, model = cnn
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                               adder_conv=AdderConvConfig(first=True)))
    x = np.random.default_rng(1).standard_normal((400, 1, 12, 12)).astype(np.float32)
    stem_out = "/stem/Conv_output_0"
    (_, got), (_, want) = run(result.model, x, [stem_out]), run(model, x, [stem_out])
    axes = (0, 2, 3)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))   # away from the zero padding
    g, w = got[interior], want[interior]
    np.testing.assert_allclose(g.mean(axes), w.mean(axes), atol=0.1 * w.std(axes).max())
    np.testing.assert_allclose(g.std(axes), w.std(axes), rtol=0.1)


def test_sign_matrix_is_hadamard_for_powers_of_two_and_well_conditioned_otherwise():
    h = sylvester(8)
    np.testing.assert_array_equal(h @ h.T, 8 * np.eye(8))
    a, cond = sign_matrix(8)
    assert cond == 1.0 and np.array_equal(a, h)
    for m in (3, 6, 10):
        a, cond = sign_matrix(m)
        assert set(np.unique(a)) <= {-1.0, 1.0} and cond == pytest.approx(np.linalg.cond(a)) and cond < 2 * m


def test_shift_add_starts_as_the_shift_conv_exactly():
    """Weights made so that A⁻¹W is exactly powers of two: the ShiftConv rounds nothing, and
    ShiftConv → 1×1 AdderConv → BatchNormalization gives the float conv's output up to float32
    rounding of the large distances (|y| ≤ M·L)."""
    torch.manual_seed(3)
    m = 8
    conv = nn.Conv2d(3, m, 3, padding=1)
    a = sylvester(m)
    exps = torch.randint(-4, 0, (m, 3 * 9)).double()
    signs = torch.where(torch.rand(m, 3 * 9) < 0.5, -1.0, 1.0).double()
    w_shift = signs * torch.exp2(exps)
    w_shift[:, 0] = 0.5 * torch.where(w_shift[:, 0] < 0, -1.0, 1.0)       # each row's peak: 2^-1
    with torch.no_grad():
        conv.weight.copy_((torch.from_numpy(a) @ w_shift).reshape(m, 3, 3, 3).float())
        conv.bias.copy_((torch.from_numpy(a) @ (torch.randint(-8, 8, (m,)).double() / 4)).float())
    wrapper = nn.Sequential(nn.Conv2d(1, 3, 1), conv)                      # a stem the pass leaves alone
    model = export(wrapper, torch.randn(1, 1, 6, 6))
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                               shift_add_conv=ShiftAddConvConfig()))
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "ShiftConv", "AdderConv", "BatchNormalization"]
    assert "condition 1" in result.report.changes[0].detail
    x = (np.random.default_rng(2).standard_normal((2, 1, 6, 6)) * 2).astype(np.float32)
    (got,) = run(result.model, x)
    (want,) = run(model, x)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=2e-4 * scale)   # inputs in Q16.16: 2^-16 per tap, float32 of M·L


def test_shift_add_on_a_cnn_is_as_close_as_shift_conv(cnn):
    from mfconvert.passes.conv import ShiftConvConfig

    module, model = cnn
    x = np.random.default_rng(4).standard_normal((16, 1, 12, 12)).astype(np.float32)
    (want,) = run(model, x)
    shift = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=ShiftConvConfig()))
    pair = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                             shift_add_conv=ShiftAddConvConfig(first=True)))
    assert [n.op_type for n in pair.model.graph.node].count("AdderConv") == 3
    err = lambda y: float(np.linalg.norm(y - want) / np.linalg.norm(want))   # noqa: E731
    (y_shift,), (y_pair,) = run(shift.model, x), run(pair.model, x)
    assert err(y_pair) < max(3 * err(y_shift), 0.05)


def test_pipeline_with_data_keeps_the_shift_add_affine(cnn, tmp_path):
    """With --data the pipeline sets L_c from the data and re-estimates the statistics of the
    BatchNormalizations shift-conv kept, but not shift-add's, which are an exact affine map."""
    from mfconvert.convert.pipeline import PipelineOptions, convert_model

    module, model = cnn
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(7)
    data = Examples([{"x": rng.standard_normal((1, 12, 12)).astype(np.float32)} for _ in range(32)])
    done = convert_model(str(path), ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                                  shift_add_conv=ShiftAddConvConfig()),
                         PipelineOptions(data=data, shift_terms=1, rounding="nearest"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in done.result.model.graph.initializer}
    bns = [n for n in done.result.model.graph.node if n.op_type == "BatchNormalization"]
    assert bns and all(np.all(inits[n.input[1]] == -1) and np.allclose(inits[n.input[4]], 1 - 1e-5) for n in bns)
    assert any("adder range L_c from max |s_c|" in line for line in done.notes)


def test_calibrate_adders_brings_the_start_closer_to_the_teacher(cnn):
    module, model = cnn
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, adder_conv=AdderConvConfig()))
    rng = np.random.default_rng(5)
    data = Examples([{"x": np.abs(rng.standard_normal((1, 12, 12))).astype(np.float32) * 3} for _ in range(96)])
    calibrated, lines = calibrate_adders(result.model, model, data, count=64)
    assert len(lines) == 2 and all("correlation with the conv" in line for line in lines)
    x = np.stack([data.items[i]["x"] for i in range(64, 96)])
    (want,) = run(model, x)
    (before,), (after,) = run(result.model, x), run(calibrated, x)
    err = lambda y: float(np.linalg.norm(y - want) / np.linalg.norm(want))   # noqa: E731
    assert err(after) < err(before)


def test_finetune_trains_adders_with_sgd_and_freeze_shift_keeps_shift_weights(cnn, tmp_path):
    module, model = cnn
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                               shift_add_conv=ShiftAddConvConfig()))
    rng = np.random.default_rng(6)
    data = Examples([{"x": rng.standard_normal((1, 12, 12)).astype(np.float32)} for _ in range(16)])
    cfg = FinetuneConfig(steps=2, batch_size=8, rounding="nearest", keep_best=False, progress=False, freeze_shift=True)
    trained = finetune(result.model, model, data, cfg).model
    before = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in trained.graph.initializer}
    shift_codes = [n.input[1] for n in result.model.graph.node if n.op_type == "ShiftConv"]
    adder_w = [n.input[1] for n in result.model.graph.node if n.op_type == "AdderConv"]
    assert shift_codes and all(np.array_equal(before[k], after[k]) for k in shift_codes)
    assert all(not np.array_equal(before[k], after[k]) for k in adder_w)
    (y,) = run(trained, data.items[0]["x"][None])
    assert np.isfinite(y).all()
    # a checkpoint holds both optimisers' states (AdamW and the adders' SGD) and resumes
    ckpt = str(tmp_path / "ft.ckpt")
    finetune(result.model, model, data, FinetuneConfig(steps=1, batch_size=8, rounding="nearest", keep_best=False,
                                                       progress=False, checkpoint=ckpt))
    resumed = finetune(result.model, model, data, FinetuneConfig(steps=2, batch_size=8, rounding="nearest",
                                                                 keep_best=False, progress=False, checkpoint=ckpt,
                                                                 resume=True))
    assert resumed.steps == 2
