"""Pass shift-linear: which linears it matches, what it refuses, and that the result computes
exactly what the PyTorch reference layer computes."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConversionError, ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.nn import ShiftLinear

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def ops(model):
    return [n.op_type for n in model.graph.node]


def convert(model, **cfg):
    return convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0, **cfg)),
                        allow_unchanged=True)


def reference(x, weight_out_in, bias, **fmt):
    layer = ShiftLinear(weight_out_in.shape[1], weight_out_in.shape[0], bias is not None, **fmt)
    layer.load_float_weight(torch.from_numpy(weight_out_in.astype(np.float32)),
                            None if bias is None else torch.from_numpy(bias.astype(np.float32)))
    return layer.eval()(torch.from_numpy(x)).numpy()


def run(model, feeds):
    from mfconvert.runtime import session
    return session(model.SerializeToString(), threads=1).run(None, feeds)[0]


def test_matmul_with_bias_add_becomes_one_shift_linear_and_matches_reference():
    w, b = RNG.normal(0, 0.1, (64, 48)).astype(np.float32), RNG.normal(0, 0.1, 48).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                        helper.make_node("Add", ["b", "h"], ["y"], name="fc_bias")],   # bias first
                       [f32("x", ["batch", "seq", 64])], [f32("y", ["batch", "seq", 48])],
                       [init("w", w), init("b", b)])
    result = convert(model)
    assert ops(result.model) == ["ShiftLinear"]
    assert [c.node for c in result.report.changes] == ["fc"]
    # Inputs, outputs and their dynamic axes are kept.
    assert result.model.graph.input[0] == model.graph.input[0]
    assert result.model.graph.output[0] == model.graph.output[0]
    x = RNG.normal(0, 2, (2, 5, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x}), reference(x, w.T, b))


def test_two_terms_run_in_ort_as_the_reference_and_through_the_executor():
    from mfconvert.nn.onnx_module import OnnxModule
    w, b = RNG.normal(0, 0.1, (64, 48)).astype(np.float32), RNG.normal(0, 0.1, 48).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                        helper.make_node("Add", ["h", "b"], ["y"], name="fc_bias")],
                       [f32("x", ["batch", 64])], [f32("y", ["batch", 48])], [init("w", w), init("b", b)])
    result = convert(model, terms=2)
    node = result.model.graph.node[0]
    assert node.op_type == "ShiftLinear" and helper.get_attribute_value(node.attribute[-1]) == 2
    assert "× 2 terms" in result.report.changes[0].detail
    x = RNG.normal(0, 2, (9, 64)).astype(np.float32)
    y = run(result.model, {"x": x})
    np.testing.assert_array_equal(y, reference(x, w.T, b, terms=2))
    # Two terms land much closer to the float layer than one (measured: 0.04 vs 0.19 relative).
    one = run(convert(model).model, {"x": x})
    exact = x @ w + b
    assert np.linalg.norm(y - exact) < 0.5 * np.linalg.norm(one - exact)
    # The PyTorch executor reads the node back and writes the same codes again.
    module = OnnxModule(result.model).eval()
    np.testing.assert_array_equal(module(x=torch.from_numpy(x))[0].numpy(), y)
    assert module.to_onnx().graph.initializer == result.model.graph.initializer


def test_gemm_transposed_with_alpha_beta_and_constant_node_weight():
    w = RNG.normal(0, 0.1, (24, 40)).astype(np.float32)          # [out, in], transB=1
    c = RNG.normal(0, 0.1, (1, 24)).astype(np.float32)
    model = make_model([helper.make_node("Constant", [], ["w"], value=init("wv", w)),
                        helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
                       [f32("x", ["n", 40])], [f32("y", ["n", 24])], [init("c", c)])
    result = convert(model)
    assert ops(result.model) == ["ShiftLinear"]
    x = RNG.normal(0, 1, (3, 40)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x}), reference(x, 0.5 * w, 2.0 * c.reshape(-1)))


def test_weight_computed_from_constants_is_folded():
    """paddle2onnx-style: the weight is Transpose(Cast(initializer))."""
    w16 = RNG.normal(0, 0.1, (32, 16)).astype(np.float16)         # stored [out, in] in fp16
    model = make_model([helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
                        helper.make_node("Transpose", ["w32"], ["w"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [f32("x", [1, 7, 16])], [f32("y", [1, 7, 32])], [init("w16", w16)])
    result = convert(model)
    assert ops(result.model) == ["ShiftLinear"]
    x = RNG.normal(0, 1, (1, 7, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x}), reference(x, w16.astype(np.float32), None))


def test_rank4_activation_and_bias_that_is_also_a_graph_output():
    w = RNG.normal(0, 0.1, (20, 12)).astype(np.float32)
    b = RNG.normal(0, 0.1, (1, 1, 1, 12)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                       [f32("x", [2, 3, 4, 20])], [f32("y", [2, 3, 4, 12]), f32("h", [2, 3, 4, 12])],
                       [init("w", w), init("b", b)])
    result = convert(model)
    assert ops(result.model) == ["ShiftLinear", "Add"]             # h is an output: bias stays an Add
    x = RNG.normal(0, 1, (2, 3, 4, 20)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x}), reference(x, w.T, None) + b)


def test_skips_are_reported_with_reasons_and_leave_the_graph_alone():
    w = RNG.normal(0, 0.1, (8, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w_in"], ["a"], name="dynamic_weight"),
                        helper.make_node("MatMul", ["a", "w"], ["b"], name="tiny"),
                        helper.make_node("MatMul", ["b", "w"], ["y"], name="head.skip_me")],
                       [f32("x", [4, 8]), f32("w_in", [8, 8])], [f32("y", [4, 8])], [init("w", w)])
    result = convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=100, exclude=["skip_me$"])),
                          allow_unchanged=True)
    reasons = {s.node: s.reason for s in result.report.skips}
    assert "graph input" in reasons["dynamic_weight"]
    assert "tiny layer: 8×8 < min_params=100" in reasons["tiny"]
    assert "excluded by --exclude" in reasons["head.skip_me"]
    assert ops(result.model) == ["MatMul"] * 3
    assert "skipped:" in result.report.table()


def test_float16_activation_is_skipped_not_converted():
    w = RNG.normal(0, 0.1, (64, 64)).astype(np.float16)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="half")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 64])], [init("w", w)])
    result = convert(model)
    assert ops(result.model) == ["MatMul"]
    assert "float16" in result.report.skips[0].reason


def test_nan_weight_is_an_error_naming_the_node():
    w = RNG.normal(0, 0.1, (16, 16)).astype(np.float32)
    w[3, 4] = np.nan
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="broken_fc")],
                       [f32("x", [1, 16])], [f32("y", [1, 16])], [init("w", w)])
    with pytest.raises(ConversionError, match="broken_fc.*NaN"):
        convert(model)


def test_report_counts_multiplications_at_the_stated_shape():
    w = RNG.normal(0, 0.1, (64, 32)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [f32("x", ["batch", "seq", 64])], [f32("y", ["batch", "seq", 32])], [init("w", w)])
    result = convert_onnx(model, ConvertConfig(), input_shapes={"x": [2, 197, 64]})
    (change,) = result.report.changes
    assert change.rows == 2 * 197 and change.macs_removed == 2 * 197 * 64 * 32
    assert change.bytes_before == 64 * 32 * 4
    assert change.bytes_after == 64 * 32 * 5 // 8 + 32       # 5-bit codes + one int8 exponent per row
    with pytest.raises(ConversionError, match="--input-shape names 'nope'"):
        convert_onnx(model, ConvertConfig(), input_shapes={"nope": [1]})


def test_report_groups_a_reason_shared_by_many_nodes():
    from mfconvert.passes.report import Skip, skip_lines
    skips = [Skip("shift-linear", f"n{i}", "same reason") for i in range(5)] + [Skip("shift-linear", "x", "other")]
    assert skip_lines(skips) == ["  5 nodes (shift-linear): same reason — n0, n1, … (+3 more)",
                                 "  x (shift-linear): other"]
