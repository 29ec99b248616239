"""Issue 11 item 6: models already quantised. A linear whose weight reaches it through
DequantizeLinear (int8/uint8 per tensor or per axis, or a QuantizeLinear → DequantizeLinear pair on
a float constant) converts from the dequantised weight (q − zp)·scale, stated in the report; the
activation's Q/DQ stays; integer MatMuls are skipped with the reason."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.runtime import session
from tests import numpy_reference as ref

RNG = np.random.default_rng(11)
IN, OUT = 48, 32


def make_model(nodes, initializers, opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def convert(model):
    return convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0)))


def run(model, x):
    return session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]


def shift_reference(x, w_in_out, bias):
    """ShiftLinear (5-bit codes, Q16.16, per-channel exponents) on the float weight, from the spec."""
    w = w_in_out.T
    e = ref.channel_exponent(w)
    sign, m = ref.round_weight_pow2(w, e, 5)
    return ref.shift_linear(x, sign, m, e, bias, 5, 32, 16)


def int8_weights(per_axis: bool, dtype=np.int8):
    info = np.iinfo(dtype)
    q = RNG.integers(info.min, info.max + 1, (IN, OUT)).astype(dtype)
    scale = (RNG.uniform(0.5, 2.0, OUT) * 2 ** -9).astype(np.float32) if per_axis else np.float32(0.0031)
    zp = (RNG.integers(-3, 4, OUT) + (128 if dtype == np.uint8 else 0)).astype(dtype) if per_axis \
        else np.asarray(128 if dtype == np.uint8 else -2, dtype)
    return q, scale, zp


def dequantised(q, scale, zp):
    """ONNX DequantizeLinear along axis 1 of [in, out] (per tensor when scale is a scalar)."""
    return ((q.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)


def test_per_axis_int8_weight_converts_from_its_dequantised_value():
    """opset 18 (onnx.reference has no DequantizeLinear-18); the weight's DequantizeLinear and int8
    initializer are gone, the layer computes ShiftLinear of (q − zp)·scale bit for bit."""
    q, scale, zp = int8_weights(per_axis=True)
    b = RNG.normal(0, 0.1, OUT).astype(np.float32)
    model = make_model([helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
                        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                        helper.make_node("Add", ["h", "b"], ["y"])], {"wq": q, "ws": scale, "wz": zp, "b": b})
    result = convert(model)
    assert [n.op_type for n in result.model.graph.node] == ["ShiftLinear"]
    assert sorted(t.name for t in result.model.graph.initializer) == ["fc.bias", "fc.codes", "fc.exponent"]
    (change,) = result.report.changes
    assert change.detail.endswith("; weights dequantised from int8 (per-channel, axis 1)")
    assert change.bytes_before == IN * OUT + 4 * OUT                   # the file held int8 weights
    assert "weights dequantised from int8 (per-channel, axis 1) (q − zero point)·scale, then rounded: 1 layer(s)" \
        in result.report.table()
    x = RNG.normal(0, 2, (7, IN)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, x), shift_reference(x, dequantised(q, scale, zp), b))


def test_per_tensor_uint8_weight_with_activation_qdq_kept():
    """The activation's QuantizeLinear → DequantizeLinear stays in front of the ShiftLinear."""
    q, scale, zp = int8_weights(per_axis=False, dtype=np.uint8)
    xs, xz = np.float32(0.02), np.uint8(120)
    model = make_model([helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
                        helper.make_node("MatMul", ["xd", "w"], ["y"], name="fc")],
                       {"xs": xs, "xz": xz, "wq": q, "ws": scale, "wz": zp})
    result = convert(model)
    assert [n.op_type for n in result.model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "ShiftLinear"]
    assert result.report.changes[0].detail.endswith("; weights dequantised from uint8 (per-tensor)")
    x = RNG.normal(0, 2, (5, IN)).astype(np.float32)
    xq = np.clip(np.rint(x / xs) + 120, 0, 255)                       # QuantizeLinear: half to even, saturate
    xd = ((xq - 120).astype(np.float32) * xs).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, x), shift_reference(xd, dequantised(q, scale, zp), None))


def test_fake_quantised_float_weight_converts_from_the_qdq_value():
    """QuantizeLinear → DequantizeLinear on a float constant, per axis: the weight is the pair's output."""
    w = RNG.normal(0, 0.1, (IN, OUT)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    zp = np.zeros(OUT, np.int8)
    model = make_model([helper.make_node("QuantizeLinear", ["wf", "ws", "wz"], ["wq"], axis=1),
                        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
                        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], {"wf": w, "ws": scale, "wz": zp})
    result = convert(model)
    assert [n.op_type for n in result.model.graph.node] == ["ShiftLinear"]
    assert result.report.changes[0].detail.endswith("int8 (per-channel, axis 1), fake-quantised from float")
    q = np.clip(np.rint(w / scale), -128, 127).astype(np.int8)
    x = RNG.normal(0, 2, (3, IN)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, x), shift_reference(x, dequantised(q, scale, zp), None))


def test_integer_matmuls_are_skipped_with_the_reason():
    """MatMulInteger's activation is quantised at run time and its output is int32: left as it is."""
    q = RNG.integers(-128, 128, (IN, OUT)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
         helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["acc"], name="qfc"),
         helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["accf", "xs"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])], [numpy_helper.from_array(q, "wq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0)), allow_unchanged=True)
    assert result.report.changes == []
    (skip,) = result.report.skips
    assert skip.node == "qfc" and "MatMulInteger multiplies integer activations" in skip.reason


def test_qdq_folding_agrees_with_onnx_reference_at_opset_21():
    """The NumPy Q/DQ (passes/graph.py) against onnx.reference where it has them (opset 21): per
    tensor, per axis (negative axis), per block of 16 along the input axis, and a float pair."""
    import onnx_graphsurgeon as gs
    from onnx.reference import ReferenceEvaluator

    from mfconvert.passes.graph import constant_value

    q = RNG.integers(-128, 128, (IN, OUT)).astype(np.int8)
    wf = RNG.normal(0, 0.1, (IN, OUT)).astype(np.float32)
    cases = {
        "tensor": ([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"])],
                   {"q": q, "s": np.float32(0.01), "z": np.int8(3)}),
        "axis": ([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=-1)],
                 {"q": q, "s": RNG.uniform(0.001, 0.01, OUT).astype(np.float32), "z": RNG.integers(-5, 5, OUT).astype(np.int8)}),
        "block": ([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0, block_size=16)],
                  {"q": q, "s": RNG.uniform(0.001, 0.01, (IN // 16, OUT)).astype(np.float32),
                   "z": RNG.integers(-5, 5, (IN // 16, OUT)).astype(np.int8)}),
        "pair": ([helper.make_node("QuantizeLinear", ["f", "s"], ["p"], axis=1),
                  helper.make_node("DequantizeLinear", ["p", "s"], ["w"], axis=1)],
                 {"f": wf, "s": (np.abs(wf).max(axis=0) / 200).astype(np.float32)}),   # uint8: negatives clip
    }
    for case, (nodes, inits) in cases.items():
        graph = helper.make_graph(nodes, case, [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        (want,) = ReferenceEvaluator(model).run(None, {})
        got = constant_value(gs.import_onnx(model).outputs[0], 21)
        assert got.dtype == np.float32, case
        np.testing.assert_array_equal(got, want, err_msg=case)
