"""The report warns about silent numeric failures (docs/ops.md#range-of-the-accumulator): an int32
accumulator that can wrap around (from calibration data, a bounding producer, or the weights
alone), weights clamped to the largest code, weights flushed to zero; and it says why the
multiplication counts are missing. Wrap-around is checked against ONNX Runtime and a NumPy
statement of the spec's arithmetic."""
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.calibrate.activation_stats import column_ranges
from mfconvert.calibrate.data import Examples
from mfconvert.cli.main import app
from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.passes.linear import UNBOUNDED_WARN_BELOW
from mfconvert.runtime import session

ACC_MAX = 2 ** 31 - 1
ONLY_SHIFT = ConvertConfig(add_attention=None)


def linear_model(weight_in_out, before=None, out_shape=("n", None)):
    """x [n, in] → (optional unary op `before`) → MatMul 'fc' with constant weight [in, out]."""
    n_in, n_out = weight_in_out.shape
    nodes, x = [], "x"
    if before is not None:
        nodes.append(helper.make_node(before, ["x"], ["h"], name="pre", **({"axis": -1} if before == "Softmax" else {})))
        x = "h"
    nodes.append(helper.make_node("MatMul", [x, "w"], ["y"], name="fc"))
    y_shape = [out_shape[0], out_shape[1] or n_out]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(weight_in_out, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def spec_ones(x_value: float, n_in: int, frac_bits: int = 16) -> np.float32:
    """docs/ops.md's arithmetic for n_in weights +1 (e_o = 0, every shift m = 0) on inputs all
    equal to x_value, in NumPy: x_q = floor(x·2^F), acc = n_in·x_q wrapped to int32, y = acc·2^−F."""
    x_q = np.int64(np.floor(np.float32(x_value) * np.float32(2.0 ** frac_bits)))
    acc = (n_in * x_q + 2 ** 31) % 2 ** 32 - 2 ** 31
    return np.float32(acc) * np.float32(2.0 ** -frac_bits)


def run(model, x):
    return session(model.SerializeToString(), threads=1).run(None, {"x": np.asarray(x, dtype=np.float32)})[0]


@pytest.fixture(scope="module")
def ones():
    """The issue's case: 1,000 inputs, every weight +1, 4 outputs."""
    return linear_model(np.ones((1000, 4)))


def test_unbounded_input_warns_with_the_safe_limit_and_the_limit_holds(ones):
    result = convert_onnx(ones, ONLY_SHIFT)
    (change,) = result.report.changes
    (warning,) = change.warnings
    # Q16.16 with 1,000 codes of 2^0 per row: no wrap while 1000·ceil(a·2^16) ≤ 2^31 − 1; the
    # stated limit is conservative by (n + S)/(2^F·S) = 3·10^-5.
    safe = change.accumulator["fc"]["safe_abs_input"]
    exact = math.floor(ACC_MAX / 1000) / 2 ** 16
    assert exact - 1e-4 < safe <= exact and f"|x| = {safe:.4g}" in warning
    assert "input range is unknown" in warning and "--exclude '^fc$'" in warning and "--data" in warning
    text = result.report.table()
    assert "\nwarnings:\n  fc: int32 accumulator wraps around for inputs beyond |x| = 32.77" in text
    assert result.report.to_dict()["warnings"] == [{"node": "fc", "pass": "shift-linear", "warning": warning}]
    # At the limit the op is exact (the spec without wrap-around); just past it, it wraps.
    at, past = np.float32(safe), np.float32(exact + 2 ** -16)
    assert run(result.model, np.full((1, 1000), at))[0, 0] == spec_ones(at, 1000) \
        == np.float32(1000 * np.floor(np.float64(at) * 2 ** 16) / 2 ** 16)
    assert run(result.model, np.full((1, 1000), past))[0, 0] == spec_ones(past, 1000) < 0


def test_calibration_data_that_overflows_is_named_and_really_wraps(ones):
    """x = 100 wraps (the issue's −31072 instead of 100,000); x = 10 does not, and no warning."""
    for x, wraps in ((100.0, True), (10.0, False)):
        examples = Examples([{"x": np.full(1000, x, dtype=np.float32)} for _ in range(3)])
        ranges = column_ranges(ones, examples)
        assert ranges["x"].shape == (1000,) and (ranges["x"] == x).all()
        result = convert_onnx(ones, ONLY_SHIFT, input_ranges=ranges)
        (change,) = result.report.changes
        got = run(result.model, np.full((2, 1000), x))
        assert (got == spec_ones(x, 1000)).all()
        float_reference = np.full((2, 1000), x, dtype=np.float64) @ np.ones((1000, 4))
        check = change.accumulator["fc"]
        assert check["bound_source"] == "calibration data" and check["input_bound"] == x
        assert check["worst_row_sum"] == 1000 * math.ceil(x * 2 ** 16)      # the NumPy bound, exact
        if wraps:
            assert got[0, 0] == -31072.0 and float_reference[0, 0] == 100000.0
            (warning,) = change.warnings
            assert warning.startswith("int32 accumulator can wrap around on the calibration data: inputs up to "
                                      "|x| = 100 give row 0 a sum of up to 6.554e+09 > 2^31 − 1 (4 of 4 rows over")
            # F = 14 is the largest that fits: 1000·100·2^14 = 1.6·10^9; 2^15 gives 3.3·10^9.
            assert "fix: --act-frac-bits 14 or lower" in warning and "--exclude '^fc$'" in warning
            fixed = convert_onnx(ones, ConvertConfig(add_attention=None, shift_linear=ShiftLinearConfig(
                act_frac_bits=14)), input_ranges=ranges)
            assert fixed.report.warnings == []
            assert (run(fixed.model, np.full((2, 1000), x)) == float_reference).all()
        else:
            assert change.warnings == [] and (got == float_reference).all()


def test_a_bounding_producer_proves_safety_or_warns():
    # Softmax outputs are at most 1: 1000·2^16 cannot wrap, although |x| > 32.7 could.
    soft = convert_onnx(linear_model(np.ones((1000, 4)), before="Softmax"), ONLY_SHIFT)
    (change,) = soft.report.changes
    assert change.warnings == [] and change.accumulator["fc"]["bound_source"] == "Softmax 'pre'"
    assert change.accumulator["fc"]["worst_row_sum"] == 1000 * 2 ** 16
    # tanh ≤ 1 on 40,000 inputs: 40000·2^16 = 2.6·10^9 can wrap, and does at tanh(x) → 1.
    wide = linear_model(np.ones((40000, 1)), before="Tanh")
    result = convert_onnx(wide, ONLY_SHIFT)
    (warning,) = result.report.changes[0].warnings
    assert "its input comes from Tanh 'pre' (|x| ≤ 1)" in warning and "2.621e+09 > 2^31 − 1" in warning
    got = run(result.model, np.full((1, 40000), 20.0))[0, 0]       # tanh(20) rounds to 1.0f
    assert got == spec_ones(1.0, 40000) < 0


def test_clamped_weights_are_counted():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)            # [in, out]
    w[3, 1], w[5, 2], w[7, 2] = 1e38, -1e38, 3e37
    result = convert_onnx(linear_model(w), ONLY_SHIFT)
    lines = result.report.changes[0].warnings
    clamp = [line for line in lines if "clamped" in line]
    assert clamp == ["3 of 1024 weights lie beyond the largest code 2^100 (channel exponents stop at ±100) and "
                     "were clamped to it (max |w| = 1e+38); fix: --exclude '^fc$' keeps the layer float"]
    # The other weights of those two output rows are far below 2^(100−15): all zero codes.
    assert any(line.startswith("125 of 1024 non-zero weights (12 %) are below half") for line in lines)
    node = next(n for n in result.model.graph.node if n.op_type == "ShiftLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    # Decoded by docs/ops.md: 5-bit codes LSB first, sign in bit 4, shift m (15 = zero), w = ±2^(e − m).
    bits = np.unpackbits(inits[node.input[1]], bitorder="little")[:1024 * 5].reshape(16, 64, 5)
    codes = (bits.astype(np.int64) << np.arange(5)).sum(axis=2)
    m, sign, e = codes & 15, codes >> 4, inits[node.input[2]].astype(np.int64)[:, None]
    decoded = np.where(m == 15, 0.0, np.where(sign == 1, -1.0, 1.0) * np.exp2((e - m).astype(np.float64)))
    assert decoded[1, 3] == 2.0 ** 100 and decoded[2, 5] == -(2.0 ** 100) and decoded[2, 7] == 2.0 ** 100
    assert np.count_nonzero(decoded[1]) == 1 and np.count_nonzero(decoded[2]) == 2


def test_weight_scale_none_clamps_and_flushes_by_count():
    w = np.full((64, 32), 0.01, dtype=np.float32)
    w[:, :4] = 3.0                                                   # above 2^0: clamped with scale "none"
    result = convert_onnx(linear_model(w), ConvertConfig(add_attention=None, shift_linear=ShiftLinearConfig(
        weight_scale="none", weight_bits=3)))
    lines = result.report.changes[0].warnings
    assert lines[0].startswith("256 of 2048 weights lie above their channel's largest code (--weight-scale none)")
    # 3-bit codes reach 2^-2; 0.01 < 2^-3 becomes 0: 1,792 of the 2,048 weights.
    assert lines[1].startswith("1792 of 2048 non-zero weights (88 %) are below half their channel's smallest code")


def test_a_normal_model_has_no_warning():
    rng = np.random.default_rng(1)
    model = linear_model(rng.standard_normal((256, 64)) / 16)
    result = convert_onnx(model, ONLY_SHIFT)
    assert result.report.warnings == [] and result.report.to_dict()["warnings"] == []
    text = result.report.table()
    assert "warnings:" not in text
    safe = result.report.changes[0].accumulator["fc"]["safe_abs_input"]
    assert safe > UNBOUNDED_WARN_BELOW and (f"int32 accumulators of the 1 layer(s) with inputs of unknown range: "
                                            f"no wrap for |x| ≤ {safe:.4g} (lowest: fc;") in text


def test_cli_prints_the_warnings_and_writes_them_to_json(ones, tmp_path):
    path = tmp_path / "ones.onnx"
    onnx.save(ones, path)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.full((4, 1000), 100.0, dtype=np.float32))
    report = tmp_path / "report.json"
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "a.onnx"), "--no-add-attention",
                                   "--data", str(data), "--report-json", str(report)])
    assert res.exit_code == 0, res.output
    assert "\nwarnings:\n  fc: int32 accumulator can wrap around on the calibration data: inputs up to |x| = 100" \
        in res.output
    saved = json.loads(report.read_text())
    assert [w["node"] for w in saved["warnings"]] == ["fc"]
    assert saved["passes"][0]["converted"][0]["warnings"] == [saved["warnings"][0]["warning"]]
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "b.onnx"), "--no-add-attention"])
    assert res.exit_code == 0 and "fc: int32 accumulator wraps around for inputs beyond |x| = 32.77" in res.output
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "c.onnx"), "--no-add-attention",
                                   "--act-frac-bits", "10"])
    assert res.exit_code == 0 and "warnings:" not in res.output        # Q22.10: safe up to |x| = 2097


def test_failed_shape_inference_is_explained(monkeypatch):
    """ONNX's non-strict inference rarely raises (it did on models past protobuf's 2 GiB); when the
    counting inference (data_prop=True, at the stated shapes) does, the report says why."""
    real = onnx.shape_inference.infer_shapes

    def failing(model, *args, **kwargs):
        if kwargs.get("data_prop"):
            raise onnx.shape_inference.InferenceError("[ShapeInferenceError] (op_type:MatMul, node name: fc): "
                                                      "Incompatible dimensions\nmore detail")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", failing)
    def no_fallback(*args):   # ORT's symbolic inference (canonicalize.py) would find the rows
        raise RuntimeError("off")
    from mfconvert.convert import canonicalize
    monkeypatch.setattr(canonicalize, "canonical_shapes", no_fallback)
    result = convert_onnx(linear_model(np.ones((256, 4)) / 256), ONLY_SHIFT, input_shapes={"x": [2, 256]})
    assert result.report.changes[0].rows is None
    note = ("multiplication counts unknown: shape inference at {'x': [2, 256]} failed: [ShapeInferenceError] "
            "(op_type:MatMul, node name: fc): Incompatible dimensions")
    assert result.report.notes == [note] and result.report.to_dict()["notes"] == [note]
    assert "multiplications removed per inference at x=[2, 256]: unknown (shapes not inferable)\n  " + note \
        in result.report.table()
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", real)
    assert convert_onnx(linear_model(np.ones((256, 4)) / 256), ONLY_SHIFT).report.notes == []


def test_the_bound_is_what_the_kernel_reaches_and_chunks_read_the_same_codes():
    """accumulator_bound(X) = Σ ceil(X / 2^m) is the kernel's |acc| at x_q = −X for positive
    weights (−(x >> m) rounds towards −inf); and reading codes in chunks of rows (any row offset,
    any bit offset, two terms) gives the codes packed."""
    from mfconvert.nn import pow2
    from mfconvert.passes.linear import _Codes

    rng = np.random.default_rng(2)
    w = np.exp2(-rng.integers(0, 14, size=(300, 8))).astype(np.float32)     # [in, out], all 2^-m > 0
    w[0] = 1.0                                                              # e_o = 0 in every row
    result = convert_onnx(linear_model(w), ONLY_SHIFT)
    x = np.full((1, 300), -750.37, dtype=np.float32)
    x_q = np.full(300, math.ceil(np.float64(np.float32(750.37)) * 2 ** 16), dtype=np.int64)  # |floor(−a·2^16)|
    shifts = pow2.code_shifts(np.round(-np.log2(w.T)).astype(np.int64)[None], 5)   # m = −log2 w
    bound = pow2.accumulator_bound(shifts, x_q)
    wrapped = (-bound + 2 ** 31) % 2 ** 32 - 2 ** 31
    assert (bound > ACC_MAX).any() and (bound <= ACC_MAX).any()           # some rows wrap, some do not
    assert (run(result.model, x)[0] == wrapped.astype(np.float32) * np.float32(2.0 ** -16)).all()
    for bits, terms in ((5, 2), (3, 1)):
        codes = rng.integers(0, 2 ** bits, size=(terms, 7, 5), dtype=np.uint8)
        reader = _Codes(pow2.pack_codes(codes, bits), terms, 7, 5, bits)
        reader.rows = 3
        assert (np.concatenate(list(reader.chunks()), axis=1) == pow2.code_shifts(codes, bits)).all()


@pytest.mark.parametrize("weight_bits", [2, 5])
def test_range_counts_agree_with_the_rounding(weight_bits):
    """The counts compare float32 bits; the rounding (round_to_codes) decides the same weights."""
    import torch

    from mfconvert.nn import pow2

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 300)) * np.exp2(rng.integers(-30, 30, size=(40, 300)))).astype(np.float32)
    w[rng.random(w.shape) < 0.1] = 0.0
    e = rng.integers(-20, 20, size=40).astype(np.int8)                # clamps and flushes on both sides
    clamped, flushed, nonzero = pow2.weight_range_counts(w, e, weight_bits)
    codes = pow2.round_to_codes(torch.from_numpy(w), torch.from_numpy(e), weight_bits).numpy()
    z = pow2.zero_shift(weight_bits)
    m = (codes & z).astype(np.int64)
    mag = np.abs(w.astype(np.float64))
    # A clamped weight gets m = 0 (the channel's top) while its own rounded power lies above it.
    expect_clamped = np.count_nonzero((m == 0) & (np.round(np.log2(np.where(mag > 0, mag, 1.0))) > e[:, None]))
    assert clamped == expect_clamped > 0
    assert flushed == np.count_nonzero((m == z) & (w != 0)) > 0 and nonzero == np.count_nonzero(w)


def test_moe_expert_layers_are_checked_too():
    """The moe-mlp pass's Shift expert: clamped weights per fc, and an accumulator that can wrap
    (fc2 sums 1,000 ReLU outputs with weight +1), named by its ShiftLinear, fixed by excluding the block."""
    from mfconvert.passes.moe_mlp import MoEMLPConfig

    w1 = np.random.default_rng(4).standard_normal((16, 1000)).astype(np.float32) / 4
    w1[2, 5] = 1e38
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ones((1000, 4), np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, moe_mlp=MoEMLPConfig()))
    fc1, fc2 = result.report.changes
    assert fc1.warnings[0].startswith("1 of 16000 weights lie beyond the largest code 2^100")
    assert fc1.warnings[0].endswith("fix: --exclude '^fc1$' keeps the layer float")
    (wrap,) = [w for w in fc1.warnings if "accumulator" in w]
    assert wrap.startswith("ShiftLinear 'fc1/moe/shift.fc2': int32 accumulator wraps around for inputs beyond "
                           "|x| = 32.77") and wrap.endswith("or --exclude '^fc1$' to keep the layer float")
    assert fc2.warnings == [] and set(fc1.accumulator) == {"fc1/moe/shift.fc1", "fc1/moe/shift.fc2"}


@pytest.mark.parametrize("gamma", [30.0, 40.0])
def test_layernorm_bound_by_its_norm(gamma):
    """LayerNorm outputs over n = 1000 have ‖x̂‖₂ ≤ √n, so a row of ±1 weights sums at most
    √n·γ·√n = 1000·γ: in Q16.16, γ = 30 gives 1.97·10^9 (safe, though one |y_i| may reach
    √999·30 = 948 and the per-element bound says otherwise), γ = 40 gives 2.6·10^9 (can wrap).
    The input with x̂ = ±1 matching the weights' signs reaches it, in ORT."""
    n = 1000
    signs = np.where(np.arange(n) < n // 2, 1.0, -1.0).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 2])],
                              [numpy_helper.from_array(np.full(n, gamma, np.float32), "g"),
                               numpy_helper.from_array(np.zeros(n, np.float32), "b"),
                               numpy_helper.from_array(np.stack([signs, signs], axis=1), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_onnx(model, ONLY_SHIFT)
    (change,) = result.report.changes
    check = change.accumulator["fc"]
    assert check["bound_source"] == "LayerNormalization 'ln'" and check["input_bound"] == pytest.approx(
        math.sqrt(n - 1) * gamma, rel=1e-3)
    # The norm bound (plus S_o + n_o = 2000 for the ceilings), 2^-12 margin for float32 LayerNorm.
    assert check["worst_row_sum"] == pytest.approx(2 ** 16 * n * gamma + 2 * n, rel=3e-4)
    got = run(result.model, signs[None])[0, 0]                       # x̂ = ±1/√(1 + ε)
    reference = n * gamma / math.sqrt(1 + 1e-5)
    if gamma == 30.0:
        assert change.warnings == [] and got == pytest.approx(reference, rel=1e-6)
    else:
        (warning,) = change.warnings
        assert "its input comes from LayerNormalization 'ln' (|x| ≤ 1265)" in warning   # √999·40, 2^-12 margin
        assert got == pytest.approx(reference - 2 ** 32 / 2 ** 16, rel=1e-6) and got < 0   # wrapped once


def test_counts_left_open_by_shape_inference_are_explained():
    """A Compress keeps its row count for run time: the report says the count is open, and where."""
    nodes = [helper.make_node("Compress", ["x", "keep"], ["h"], axis=0), helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256]),
                                           helper.make_tensor_value_info("keep", TensorProto.BOOL, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])],
                              [numpy_helper.from_array(np.ones((256, 4), np.float32) / 256, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_onnx(model, ONLY_SHIFT)
    assert result.report.changes[0].rows is None
    assert result.report.notes == ["multiplication counts unknown for 1 layer(s) (first: fc): shape inference at "
                                   "{'x': [1, 256], 'keep': [1]} left their input shapes open; dynamic dims were "
                                   "taken as 1, --input-shape sets them"]
