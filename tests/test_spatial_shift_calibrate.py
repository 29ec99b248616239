"""Spatial shifts calibrated on data (calibrate/spatial_shift.py): the least-squares offset, scale and
bias per channel against a NumPy reference written out channel by channel (np.pad, np.linalg.lstsq);
the shifted plane against the SpatialShift layer; the ridge solution against NumPy's; and, end to
end through convert_model with --data, the converted block's error on held-out inputs falls
with the calibration (step 1 alone, then with the pointwise refit), measured in ONNX Runtime."""
import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.spatial_shift import Normal, calibrate_shifts, fit_channels, shift_plane
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.convert.pipeline import PipelineOptions, convert_model
from mfconvert.nn.spatial_shift import SpatialShift
from mfconvert.passes.spatial_shift import SpatialShiftConfig
from mfconvert.runtime import session

TAPS = [[dy, dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def reference_fit(x: np.ndarray, y: np.ndarray, candidates, strides, padding):
    """Per channel, per candidate: the shifted plane by padding and slicing, the affine least
    squares by np.linalg.lstsq; the candidate of least residual."""
    n, c, h, w = x.shape
    sh, sw = strides
    oh, ow = -(-h // sh), -(-w // sw)
    r = 1 + max(max(abs(a), abs(b)) for a, b in candidates)
    padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="constant" if padding == "zeros" else "edge")
    offsets, scales, biases = [], [], []
    for ch in range(c):
        best = None
        for dy, dx in candidates:
            z = padded[:, ch, r + dy: r + dy + sh * oh: sh, r + dx: r + dx + sw * ow: sw]
            design = np.stack([z.ravel(), np.ones(z.size)], 1)
            coef, *_ = np.linalg.lstsq(design, y[:, ch].ravel(), rcond=None)
            res = float(((design @ coef - y[:, ch].ravel()) ** 2).sum())
            if best is None or res < best[0] - 1e-9:
                best = (res, (dy, dx), coef)
        offsets.append(best[1])
        scales.append(best[2][0])
        biases.append(best[2][1])
    return np.array(offsets), np.array(scales), np.array(biases)


@pytest.mark.parametrize("strides,padding", [((1, 1), "zeros"), ((2, 2), "zeros"), ((2, 1), "edge")])
def test_channel_fit_matches_numpy_reference(strides, padding):
    rng = np.random.default_rng(sum(strides) + len(padding))
    x = rng.normal(size=(3, 6, 9, 8))
    x = x + np.roll(x, 1, 2) + np.roll(x, 1, 3)          # correlated neighbours, as images have
    kernels = rng.normal(size=(6, 1, 3, 3))
    y = F.conv2d(torch.from_numpy(x), torch.from_numpy(kernels), stride=strides, padding=1, groups=6).numpy()
    y = y + 0.3 + 0.1 * rng.normal(size=y.shape)
    fit = fit_channels([(x[:2], y[:2]), (x[2:], y[2:])], TAPS, strides, padding)   # two batches summed
    offsets, scales, biases = reference_fit(x, y, TAPS, strides, padding)
    np.testing.assert_array_equal(fit.offsets, offsets)
    # float64 sums of ~200 products (ours by moments, NumPy's by QR): agree far below 1e-8
    np.testing.assert_allclose(fit.scale, scales, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.bias, biases, rtol=1e-8, atol=1e-10)
    assert np.all((fit.explained >= 0) & (fit.explained <= 1))


def test_shift_plane_is_the_layer():
    x = torch.randn(2, 4, 7, 6)
    for strides, padding in (((1, 1), "zeros"), ((2, 2), "edge"), ((1, 2), "zeros")):
        for dy, dx in ((-1, 1), (0, 0), (2, -3)):
            layer = SpatialShift(4, np.tile([dy, dx], (4, 1)), strides=strides, padding=padding).eval()
            torch.testing.assert_close(shift_plane(x, dy, dx, strides, padding), layer(x), rtol=0, atol=0)


def test_ridge_solution_matches_numpy():
    rng = np.random.default_rng(3)
    f, t = rng.normal(size=(4, 5, 3, 3)), rng.normal(size=(4, 2, 3, 3))
    eq = Normal()
    eq.add(f[:2], t[:2])
    eq.add(f[2:], t[2:])
    rows_f = np.concatenate([f.transpose(0, 2, 3, 1).reshape(-1, 5), np.ones((36, 1))], 1)
    rows_t = t.transpose(0, 2, 3, 1).reshape(-1, 2)
    want, *_ = np.linalg.lstsq(rows_f, rows_t, rcond=None)
    np.testing.assert_allclose(eq.solve(0.0), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eq.error(want), ((rows_f @ want - rows_t) ** 2).sum(), rtol=1e-9)
    lam = 0.5 * float((rows_f[:, :5] ** 2).sum(0).mean())   # ridge 0.5: λ relative to the mean energy
    reg = np.diag([lam] * 5 + [0.0])
    np.testing.assert_allclose(eq.solve(0.5), np.linalg.solve(rows_f.T @ rows_f + reg, rows_f.T @ rows_t), rtol=1e-9)


class Residual(nn.Module):
    """stem conv → ReLU6 → depthwise 3×3 → BN → ReLU6 → 1×1 conv, added to the stem's output
    (MobileNetV2's inverted residual without its expansion); depthwise kernels spread over their
    taps, so one tap alone is a poor copy."""

    def __init__(self, c: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU6())
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)
        self.dw.weight.data = 0.5 * torch.randn(c, 1, 3, 3) + 0.3
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        s = self.stem(x)
        return s + self.pw(F.relu6(self.bn(self.dw(s))))


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (neighbouring pixels correlated, as in photographs)."""
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32))
    return (2 * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)).numpy()


def test_calibration_lowers_held_out_error(tmp_path):
    """Data-free → step 1 (offsets and scales on data) → step 1 + pointwise refit: the block's
    output error on inputs the calibration never saw falls at each step, by a margin."""
    buf = io.BytesIO()
    torch.onnx.export(Residual().eval(), torch.zeros(1, 3, 16, 16), buf, input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    original = onnx.load_from_string(buf.getvalue())
    path = tmp_path / "block.onnx"
    onnx.save(original, str(path))
    config = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,   # the least-squares steps alone
                           spatial_shift=SpatialShiftConfig(reconstruct_minutes=0))
    data = Examples([{"x": x} for x in images(48, 1)])
    held_out = images(64, 2)
    want = session(original.SerializeToString()).run(None, {"x": held_out})[0]

    def error(model: onnx.ModelProto) -> float:   # relative to the output's spread
        got = session(model.SerializeToString()).run(None, {"x": held_out})[0]
        return float(((got - want) ** 2).sum() / ((want - want.mean((0, 2, 3), keepdims=True)) ** 2).sum())

    free = convert_onnx(original, config)
    step1, _ = calibrate_shifts(free.model, original, data, free.report.changes, refit=False)
    piped = convert_model(str(path), config, PipelineOptions(data=data, shift_terms=1, rounding="nearest"))
    change, = piped.result.report.changes
    assert any("1 layer(s) calibrated on 48 examples" in line for line in piped.notes)
    assert change.calibration["ridge"] is not None       # the refit won on the calibration's own held-out share
    assert change.calibration["held_out_error_after"] < change.calibration["held_out_error_before"]
    e_free, e_step1, e_refit = error(free.model), error(step1), error(piped.result.model)
    # measured 0.42 → 0.16 → 0.13
    assert e_step1 < 0.6 * e_free and e_refit < 0.9 * e_step1, (e_free, e_step1, e_refit)


def test_channels_no_shift_explains_stay_depthwise():
    """channels_to_keep measures each channel's best-shift share of variance on the original's own
    activations (checked against the NumPy reference on the same tensors, read from ORT); the
    pass then keeps exactly those channels depthwise, and the calibration fits the rest."""
    from mfconvert.calibrate.spatial_shift import channels_to_keep

    buf = io.BytesIO()
    torch.onnx.export(Residual(seed=4).eval(), torch.zeros(1, 3, 16, 16), buf, input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    original = onnx.load_from_string(buf.getvalue())
    config = lambda **kw: ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,  # noqa: E731
                                        spatial_shift=SpatialShiftConfig(**kw))
    first = convert_onnx(original, config()).report.changes
    x = images(24, 5)
    data = Examples([{"x": v} for v in x])
    change, = first
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in (change.shift_input, change.output)])
    xs, ys = session(probe.SerializeToString()).run([change.shift_input, change.output], {"x": x})
    offsets, scales, biases = reference_fit(xs.astype(np.float64), ys.astype(np.float64), TAPS, (1, 1), "zeros")
    z = np.stack([np.pad(xs[:, c], ((0, 0), (1, 1), (1, 1)))[:, 1 + dy: 17 + dy, 1 + dx: 17 + dx]
                  for c, (dy, dx) in enumerate(offsets)], 1)
    resid = ((ys - scales[None, :, None, None] * z - biases[None, :, None, None]) ** 2).sum((0, 2, 3))
    want = 1 - resid / ((ys - ys.mean((0, 2, 3), keepdims=True)) ** 2).sum((0, 2, 3))
    threshold = float(np.median(want))
    keep, explained = channels_to_keep(original, data, first, threshold)
    np.testing.assert_allclose(explained[change.node], want, rtol=1e-4, atol=1e-5)   # float32 tensors, float64 sums
    assert keep[change.node] == [int(c) for c in np.flatnonzero(want < threshold)] and 0 < len(keep[change.node]) < 12
    result = convert_onnx(original, config(keep_channels=keep))
    kept, = result.report.changes
    assert kept.kept_depthwise == len(keep[change.node]) and "chosen on data" in kept.detail
    calibrated, lines = calibrate_shifts(result.model, original, data, result.report.changes)
    assert kept.calibration["explained_variance_median"] >= threshold   # only the well-explained channels shift


def test_default_pipeline_calibrates_before_shift_conv(tmp_path):
    """With shift-conv also on (the default), the spatial shifts are calibrated (and their blocks
    trained) while the convs are float, then shift-conv quantises the refit convs: the layer has
    its figures, the report lists spatial-shift before shift-conv, the written config keeps
    spatial_shift, and the output on held-out inputs is closer to the original's than the
    data-free conversion's (measured in ONNX Runtime)."""
    import json

    buf = io.BytesIO()
    torch.onnx.export(Residual().eval(), torch.zeros(1, 3, 16, 16), buf, input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    path = tmp_path / "block.onnx"
    path.write_bytes(buf.getvalue())
    original = onnx.load_from_string(buf.getvalue())
    config = ConvertConfig(spatial_shift=SpatialShiftConfig(reconstruct_minutes=0.2, reconstruct_steps=300))
    options = dict(shift_terms=2, rounding="nearest")
    piped = convert_model(str(path), config, PipelineOptions(data=Examples([{"x": x} for x in images(48, 1)]), **options))
    free = convert_model(str(path), config, PipelineOptions(**options))
    ops = [n.op_type for n in piped.result.model.graph.node]
    # the shift is read through by the ShiftConv after it (its input shift, inputs 4-6)
    read_through = [n for n in piped.result.model.graph.node if n.op_type == "ShiftConv" and len(n.input) > 4]
    assert "ShiftConv" in ops and "Conv" not in ops and ("SpatialShift" in ops or read_through)
    passes = [c.pass_name for c in piped.result.report.changes]
    assert passes[0] == "spatial-shift" and "shift-conv" in passes[1:]
    change = piped.result.report.changes[0]
    assert change.calibration is not None and "reconstruction" in change.calibration
    assert any("1 layer(s) calibrated on 48 examples" in line for line in piped.notes)
    assert any("block(s) trained on their output error" in line for line in piped.notes)
    props = {p.key: p.value for p in piped.result.model.metadata_props}
    assert json.loads(props["mfconvert.config"])["spatial_shift"]["reconstruct_steps"] == 300
    assert piped.config.spatial_shift is not None
    assert piped.result.report.file_bytes_before == path.stat().st_size
    held_out = images(64, 2)
    want = session(original.SerializeToString()).run(None, {"x": held_out})[0]

    def error(model):
        got = session(model.SerializeToString()).run(None, {"x": held_out})[0]
        return float(((got - want) ** 2).sum() / ((want - want.mean((0, 2, 3), keepdims=True)) ** 2).sum())

    e_free, e_data = error(free.result.model), error(piped.result.model)
    assert e_data < 0.6 * e_free, (e_free, e_data)


class TwoBlocks(nn.Module):
    """stem → MobileNetV2's inverted residual (1×1 expansion, BN, ReLU6, depthwise 3×3, BN, ReLU6,
    1×1 projection, BN, + skip) → a stride-2 one without skip; depthwise kernels spread over
    their taps (a poor one-tap copy, which training the block can improve on)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())

        def block(c_in, c_mid, c_out, stride):
            layers = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid), nn.ReLU6(),
                                   nn.Conv2d(c_mid, c_mid, 3, stride, 1, groups=c_mid, bias=False),
                                   nn.BatchNorm2d(c_mid), nn.ReLU6(), nn.Conv2d(c_mid, c_out, 1, bias=False),
                                   nn.BatchNorm2d(c_out))
            layers[3].weight.data = 0.4 * torch.randn(c_mid, 1, 3, 3) + 0.2
            for bn in (layers[1], layers[4], layers[7]):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
            return layers

        self.a, self.b = block(8, 24, 8, 1), block(8, 24, 12, 2)

    def forward(self, x):
        s = self.stem(x)
        return self.b(s + self.a(s))


def _two_blocks():
    buf = io.BytesIO()
    torch.onnx.export(TwoBlocks().eval(), torch.zeros(1, 3, 16, 16), buf, input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def _with_outputs(model, names):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
    return probe.SerializeToString()


def test_block_is_expansion_to_add_and_extracts_exactly():
    """block_of finds each converted layer's block from the graph (the expansion conv's input,
    through the projection, the Add where there is one); the extracted block run alone in ORT
    gives the full model's tensor there from the full model's own block input."""
    from mfconvert.calibrate.spatial_shift import _consumers, _layers, block_of, extract_block

    original = _two_blocks()
    config = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, spatial_shift=SpatialShiftConfig())
    free = convert_onnx(original, config)
    layers, skipped = _layers(free.model, free.report.changes)
    assert len(layers) == 2 and not skipped
    producer = {o: n for n in free.model.graph.node for o in n.output}
    x = images(5, 7)
    for layer, residual in zip(layers, (True, False)):
        inputs, end = block_of(layer, _consumers(free.model))
        assert inputs[0] == layer.expand.input[0] and len(inputs) == 1     # MobileNetV2's skip is the block input
        assert producer[end].op_type == ("Add" if residual else "Conv")
        block = extract_block(free.model, inputs, end)
        ops = [n.op_type for n in block.graph.node]
        assert ops.count("SpatialShift") == 1 and ops.count("Add") == int(residual) and ops.count("Conv") == 3
        got_in, want = session(_with_outputs(free.model, [inputs[0], end])).run([inputs[0], end], {"x": x})
        got, = session(block.SerializeToString()).run([end], {inputs[0]: got_in})
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)   # the same float ops on the same inputs
    # a block whose input does not cut it off from the model's input: refused, naming the tensor
    assert "neither an input of the block" in extract_block(free.model, ["nothing"], layers[1].change.output)


def test_reconstruction_lowers_held_out_block_error():
    """After the least-squares calibration, training each block (reconstruct_blocks) lowers the
    model's error against the original on inputs neither step saw (ORT, relative to the output's
    spread), and every block's held-out figure falls or the block is kept as calibrated."""
    from mfconvert.calibrate.spatial_shift import Reconstruction, reconstruct_blocks

    original = _two_blocks()
    config = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, spatial_shift=SpatialShiftConfig())
    free = convert_onnx(original, config)
    data = Examples([{"x": x} for x in images(64, 1)])
    calibrated, _ = calibrate_shifts(free.model, original, data, free.report.changes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a few hundred small steps: one thread is the fastest on a shared machine
    try:
        trained, lines = reconstruct_blocks(calibrated, original, data, free.report.changes,
                                            Reconstruction(minutes=0.2, steps=200, lr=1e-2))
    finally:
        torch.set_num_threads(threads)
    held_out = images(64, 2)
    want = session(original.SerializeToString()).run(None, {"x": held_out})[0]

    def error(model):
        got = session(model.SerializeToString()).run(None, {"x": held_out})[0]
        return float(((got - want) ** 2).sum() / ((want - want.mean((0, 2, 3), keepdims=True)) ** 2).sum())

    e_cal, e_trained = error(calibrated), error(trained)
    assert e_trained < 0.8 * e_cal, (e_cal, e_trained)
    assert "2 block(s) trained" in lines[0] and "the model's held-out output error" in lines[0]
    for change in free.report.changes:
        fig = change.calibration["reconstruction"]
        assert fig["steps"] > 0
        assert fig["held_out_error_after"] <= fig["held_out_error_before"]
        assert fig["kept"] == (fig["held_out_error_after"] < fig["held_out_error_before"])
    # the offsets stay integers (int64 initializers the kernel reads) and as calibrated (not trained)
    offsets = lambda m: [onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith(".offsets")]  # noqa: E731
    for a, b in zip(offsets(calibrated), offsets(trained)):
        assert b.dtype == np.int64 and np.array_equal(a, b)


def test_block_training_that_does_not_help_is_not_kept():
    """A learning rate that wrecks the block: the held-out error never falls, so train_block
    returns no block and reconstruct_blocks leaves the calibrated weights exactly as they were."""
    from mfconvert.calibrate.spatial_shift import Reconstruction, reconstruct_blocks

    original = _two_blocks()
    config = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, spatial_shift=SpatialShiftConfig())
    free = convert_onnx(original, config)
    data = Examples([{"x": x} for x in images(32, 1)])
    calibrated, _ = calibrate_shifts(free.model, original, data, free.report.changes)
    trained, lines = reconstruct_blocks(calibrated, original, data, free.report.changes,
                                        Reconstruction(minutes=0.1, steps=20, lr=50.0, check_every=5))
    assert "kept where the held-out error fell: 0" in lines[0]
    for a, b in zip(calibrated.graph.initializer, trained.graph.initializer):
        assert a.name == b.name and np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_blocks_are_not_kept_when_the_models_output_does_not_improve(monkeypatch):
    """Blocks that each improved are still all dropped when the whole model's held-out output error
    does not fall (the guard reconstruct_blocks applies last); the error itself is NumPy's."""
    from mfconvert.calibrate import spatial_shift
    from mfconvert.calibrate.spatial_shift import Reconstruction, _output_error, reconstruct_blocks

    rng = np.random.default_rng(0)
    want = [[rng.normal(size=(2, 3)), np.arange(3)], [rng.normal(size=(1, 3)), np.arange(3)]]
    got = [[w[0] + 0.1 * rng.normal(size=w[0].shape), w[1]] for w in want]
    ref = (sum(((g[0] - w[0]) ** 2).sum() for g, w in zip(got, want)) / sum((w[0] ** 2).sum() for w in want))
    assert _output_error(got, want) == pytest.approx(ref, rel=1e-12)   # integer outputs are not errors

    original = _two_blocks()
    config = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, spatial_shift=SpatialShiftConfig())
    free = convert_onnx(original, config)
    data = Examples([{"x": x} for x in images(64, 1)])
    calibrated, _ = calibrate_shifts(free.model, original, data, free.report.changes)
    errors = iter([1.0, 2.0])   # before, after: the model's output error rose
    monkeypatch.setattr(spatial_shift, "_output_error", lambda got, want: next(errors))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:   # test_reconstruction_lowers_held_out_block_error's training (blocks are kept), less time
        trained, lines = reconstruct_blocks(calibrated, original, data, free.report.changes,
                                            Reconstruction(minutes=0.12, steps=200, lr=1e-2))
    finally:
        torch.set_num_threads(threads)
    assert "kept where the held-out error fell: 0" not in lines[0]
    assert "none kept: the model's held-out output error rose 1 → 2" in lines[0]
    assert all(not c.calibration["reconstruction"]["kept"] for c in free.report.changes)
    for a, b in zip(calibrated.graph.initializer, trained.graph.initializer):
        assert a.name == b.name and np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
