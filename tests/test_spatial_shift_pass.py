"""Pass spatial-shift: a block conv → BN → ReLU6 → depthwise 3×3 (stride 1 and 2) → BN [→ ReLU6]
→ 1×1 conv, exported by torch, converted with the pass alone and run in ONNX Runtime (our kernel),
against the same torch block whose depthwise kernels keep only their dominant tap (the others
zeroed: the function the pass promises); the scale folded into the 1×1 conv where it reads the
depthwise output alone, a 1×1 depthwise conv where a ReLU6 sits between; fidelity keeps channels depthwise (then
exactly the original kernels for those); skips with reasons; the layer and the registry entry."""
import copy
import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.passes.spatial_shift import SpatialShiftConfig, dominant_taps
from mfconvert.runtime import session


class Block(nn.Module):
    def __init__(self, stride: int, relu_between: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6() if relu_between else nn.Identity()
        self.pw = nn.Conv2d(8, 5, 1)
        for bn in (self.stem[1], self.bn):   # non-trivial statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.pw(self.act(self.bn(self.dw(self.stem(x)))))


def export(model: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.zeros(1, 3, 9, 10), buf, input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, do_constant_folding=False,
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def convert(model, **cfg):
    return convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                             spatial_shift=SpatialShiftConfig(**cfg)), allow_unchanged=True)


def masked(block: Block, keep: np.ndarray | None = None) -> Block:
    """A copy of the block with each depthwise kernel reduced to its dominant tap (channels in
    `keep`: whole)."""
    block = copy.deepcopy(block)
    w = block.dw.weight.detach().numpy()
    flat = w.reshape(8, -1)
    mask = np.zeros_like(flat)
    mask[np.arange(8), np.abs(flat).argmax(1)] = 1
    if keep is not None:
        mask[keep] = 1
    block.dw.weight.data = torch.from_numpy((flat * mask).reshape(w.shape))
    return block


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu_between", [False, True])
def test_block_computes_the_dominant_tap_conv(stride, relu_between):
    block = Block(stride, relu_between, seed=stride * 2 + relu_between)
    result = convert(export(block))
    ops = [n.op_type for n in result.model.graph.node]
    # stem and 1×1 left, and the scale as a 1×1 depthwise conv where a ReLU6 keeps it from the 1×1
    assert ops.count("SpatialShift") == 1 and ops.count("Conv") == 2 + relu_between
    change, = result.report.changes
    assert "BatchNormalization" in change.detail and change.in_features == 9 and change.out_features == 8
    assert ("folded into" in change.detail) == (not relu_between)
    oh, ow = -(-9 // stride), -(-10 // stride)
    assert change.macs_removed == oh * ow * 8 * (9 - relu_between)
    # the JSON report's per-layer figures (batch 1): weights removed, bytes the shift writes (float32)
    row, = result.report.to_dict()["passes"][0]["converted"]
    assert row["params_removed"] == 8 * (9 - relu_between) and row["bytes_moved"] == oh * ow * 8 * 4
    assert row["channels_shifted"] == 8 and row["channels_kept_depthwise"] == 0
    x = np.random.default_rng(stride).normal(size=(2, 3, 9, 10)).astype(np.float32)
    got = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        want = masked(block).eval()(torch.from_numpy(x)).numpy()
    # BN and the scale folded in another order: float32 rounding of sums of ~10 terms of size ≤ ~10
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fidelity_keeps_channels_depthwise():
    block = Block(1, True, seed=7)
    w = block.dw.weight.detach().numpy().reshape(8, -1)
    _, _, _, share = dominant_taps(w.reshape(8, 1, 3, 3))
    target = float(np.sort(share)[3])        # half the channels below it
    result = convert(export(block), fidelity=target)
    keep = np.flatnonzero(share < target)
    change, = result.report.changes
    assert change.kept_depthwise == keep.size == 3 and "3 kept depthwise" in change.detail
    x = np.random.default_rng(9).normal(size=(1, 3, 9, 10)).astype(np.float32)
    got = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        want = masked(block, keep).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # nothing shift-like enough: the layer stays, with the reason
    result = convert(export(block), fidelity=1.0)
    assert not result.report.changes
    assert any("stays depthwise" in s.reason for s in result.report.skips)


def test_skips_name_their_reason():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.v = nn.Conv2d(8, 8, 3, padding=0, groups=8)

        def forward(self, x):
            return self.v(self.g(x))

    buf = io.BytesIO()
    torch.onnx.export(Grouped().eval(), torch.zeros(1, 8, 6, 6), buf, dynamo=False, opset_version=17)
    result = convert(onnx.load_from_string(buf.getvalue()))
    reasons = " | ".join(s.reason for s in result.report.skips)
    assert "not depthwise (group 2" in reasons and "not 'same'" in reasons and not result.report.changes
    with pytest.raises(ValueError, match="fidelity must be in"):
        SpatialShiftConfig(fidelity=1.5)


def test_finetune_trains_offsets_and_scales_and_exports_integers():
    """calibrate.finetune (`mfconvert finetune`) through the registry entry: the offsets move, the
    loss falls, the export carries int64 offsets and runs in ONNX Runtime as the trained layers."""
    from mfconvert.calibrate.data import Examples
    from mfconvert.calibrate.finetune import FinetuneConfig, finetune

    block = Block(1, True, seed=11)
    teacher = export(block)
    student = convert(teacher, sparsity=0.01).model
    node = next(n for n in student.graph.node if n.op_type == "SpatialShift")
    before = onnx.numpy_helper.to_array(next(i for i in student.graph.initializer if i.name == node.input[1]))
    rng = np.random.default_rng(0)
    data = Examples([{"x": rng.normal(size=(3, 9, 10)).astype(np.float32)} for _ in range(32)])
    result = finetune(student, teacher, data, FinetuneConfig(steps=30, batch_size=8, lr=5e-3, rounding="nearest",
                                                            progress=False, keep_best=False))
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    node = next(n for n in result.model.graph.node if n.op_type == "SpatialShift")
    after = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == node.input[1]))
    assert after.dtype == np.int64 and after.shape == before.shape and not np.array_equal(after, before)
    assert any(a.name == "sparsity" for a in node.attribute)
    x = rng.normal(size=(4, 3, 9, 10)).astype(np.float32)
    got = session(result.model.SerializeToString()).run(None, {"x": x})[0]
    from mfconvert.nn.onnx_module import OnnxModule
    with torch.no_grad():
        want = OnnxModule(result.model).eval()(x=torch.from_numpy(x))
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_least_squares_scale_under_the_correlation_prior():
    """neighbour_correlation ρ: the scale minimising E[(Σ w_k x_k − a·x_tap)²] for unit-variance
    inputs with E[x_k x_j] = ρ^|k − j|₁, checked against the normal equation solved from the
    explicit covariance; ρ = 1 gives the kernel's sum, ρ = 0 the tap's weight."""
    from mfconvert.passes.spatial_shift import least_squares_scale
    rng = np.random.default_rng(4)
    w = rng.normal(size=(5, 1, 3, 3))
    u, v, tap_w, _ = dominant_taps(w)
    pos = np.array([(i, j) for i in range(3) for j in range(3)])
    for rho in (0.0, 0.6, 1.0):
        cov = rho ** np.abs(pos[:, None] - pos[None]).sum(-1)      # 0^0 = 1 on the diagonal
        got = least_squares_scale(w, u, v, rho)
        for c in range(5):
            tap = u[c] * 3 + v[c]
            want = cov[tap] @ w[c].reshape(-1) / cov[tap, tap]     # E[x_tap y] / E[x_tap²]
            assert got[c] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(least_squares_scale(w, u, v, 1.0), w.sum(axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(least_squares_scale(w, u, v, 0.0), tap_w, rtol=1e-12)
    with pytest.raises(ValueError, match="neighbour_correlation"):
        SpatialShiftConfig(neighbour_correlation=2.0)


def test_cli_flag_and_config(tmp_path):
    """--spatial-shift turns on SpatialShiftConfig (off by default); a JSON config with fidelity
    and neighbour_correlation round-trips and drives the pass; a bad key is a one-line error."""
    import json

    from typer.testing import CliRunner

    from mfconvert.cli.main import app
    path = tmp_path / "block.onnx"
    onnx.save(export(Block(1, True, seed=3)), str(path))
    assert ConvertConfig().spatial_shift is None
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "a.onnx"), "--spatial-shift", "--no-shift-conv",
                                   "--save-config", str(tmp_path / "cfg.json")])
    assert res.exit_code == 0, res.output
    assert "SpatialShift" in [n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node]
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert saved["spatial_shift"]["fidelity"] is None
    saved["spatial_shift"].update(fidelity=0.3, neighbour_correlation=0.5)
    cfg = ConvertConfig.from_dict(saved)
    assert cfg.spatial_shift == SpatialShiftConfig(fidelity=0.3, neighbour_correlation=0.5)
    assert ConvertConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="spatial_shift: unknown key 'offsets'"):
        ConvertConfig.from_dict({"spatial_shift": {"offsets": 1}})


def test_spatial_shift_takes_the_depthwise_conv_before_shift_conv_and_adder_conv():
    """passes.registry.ORDER, not import order: with shift-conv and adder-conv on too, the depthwise
    conv still becomes a SpatialShift and the conv passes get only the stem and the 1×1 conv."""
    from mfconvert.passes.adder_conv import AdderConvConfig
    from mfconvert.passes.conv import ShiftConvConfig
    block = Block(1, False, seed=3)
    for others in (dict(shift_conv=ShiftConvConfig()), dict(shift_conv=None, adder_conv=AdderConvConfig(first=True))):
        result = convert_onnx(export(block), ConvertConfig(shift_linear=None, add_attention=None,
                                                           spatial_shift=SpatialShiftConfig(), **others))
        ops = sorted(c.new_op for c in result.report.changes)
        conv_op = "ShiftConv" if "shift_conv" in others and others["shift_conv"] else "AdderConv"
        assert ops == sorted(["SpatialShift", conv_op, conv_op]), ops


def test_reconstruction_config_fields_round_trip_and_are_checked():
    """The reconstruction's --config fields: defaults, a JSON round trip, and one-line errors naming
    the field for values out of range or of the wrong type."""
    cfg = SpatialShiftConfig()
    assert (cfg.reconstruct_minutes, cfg.reconstruct_steps, cfg.reconstruct_lr, cfg.reconstruct_offsets) == (2.0, 2000, 1e-3, False)
    given = ConvertConfig(spatial_shift=SpatialShiftConfig(reconstruct_minutes=0.5, reconstruct_offsets=True))
    assert ConvertConfig.from_dict(given.to_dict()).spatial_shift == given.spatial_shift
    for bad, words in (({"reconstruct_minutes": -1}, "reconstruct_minutes"), ({"reconstruct_lr": 0}, "reconstruct_lr"),
                       ({"reconstruct_offsets": "yes"}, "reconstruct_offsets")):
        with pytest.raises(ValueError, match=words):
            ConvertConfig.from_dict({"spatial_shift": bad})
