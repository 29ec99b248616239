"""Pass moe-mlp on hand-built graphs: every activation form exporters write, the cases it must
leave alone (silently, or with a reason), and that forced routings compute exactly the float
MLP (all-Mult) and the shift-linear conversion of the same MLP (all-Shift)."""
import json
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.passes import moe_mlp
from mfconvert.passes.graph import claimant
from mfconvert.runtime import session

RNG = np.random.default_rng(0)
D, HIDDEN = 24, 64
FORCE = 30.0   # |logit difference| ≥ 17 makes the gate exactly 1.0f (docs/ops.md)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def scalar(name, value):
    return init(name, np.array(value, dtype=np.float32))


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


# Activations from tensor "h" to tensor "a", as exporters write them.
ACTIVATIONS = {
    "gelu_erf_torch": ("GELU", [node("Div", ["h", "sqrt2"], ["t0"]), node("Erf", ["t0"], ["t1"]),
                                node("Add", ["t1", "one"], ["t2"]), node("Mul", ["h", "t2"], ["t3"]),
                                node("Mul", ["t3", "half"], ["a"])]),
    "gelu_erf_half_first": ("GELU", [node("Mul", ["half", "h"], ["t0"]), node("Mul", ["h", "inv_sqrt2"], ["t1"]),
                                     node("Erf", ["t1"], ["t2"]), node("Add", ["one", "t2"], ["t3"]),
                                     node("Mul", ["t0", "t3"], ["a"])]),
    "gelu_erf_constant_nodes": ("GELU", [
        node("Constant", [], ["c_sqrt2"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [math.sqrt(2)])),
        node("Div", ["h", "c_sqrt2"], ["t0"]), node("Erf", ["t0"], ["t1"]), node("Add", ["t1", "one"], ["t2"]),
        node("Mul", ["t2", "half"], ["t3"]), node("Mul", ["t3", "h"], ["a"])]),
    "gelu_op": ("GELU", [node("Gelu", ["h"], ["a"])]),
    "gelu_op_tanh": ("GELU(tanh)", [node("Gelu", ["h"], ["a"], approximate="tanh")]),
    "gelu_tanh_decomposed": ("GELU(tanh)", [
        node("Pow", ["h", "three"], ["t0"]), node("Mul", ["t0", "c044715"], ["t1"]), node("Add", ["h", "t1"], ["t2"]),
        node("Mul", ["t2", "sqrt_2_pi"], ["t3"]), node("Tanh", ["t3"], ["t4"]), node("Add", ["t4", "one"], ["t5"]),
        node("Mul", ["h", "half"], ["t6"]), node("Mul", ["t6", "t5"], ["a"])]),
    "silu": ("SiLU", [node("Sigmoid", ["h"], ["t0"]), node("Mul", ["h", "t0"], ["a"])]),
    "silu_swapped": ("SiLU", [node("Sigmoid", ["h"], ["t0"]), node("Mul", ["t0", "h"], ["a"])]),
    "relu": ("ReLU", [node("Relu", ["h"], ["a"])]),
}
SCALARS = [scalar("sqrt2", math.sqrt(2)), scalar("inv_sqrt2", 1 / math.sqrt(2)), scalar("one", 1.0),
           scalar("half", 0.5), scalar("three", 3.0), scalar("c044715", 0.044715),
           scalar("sqrt_2_pi", math.sqrt(2 / math.pi))]


def mlp_model(activation, x_shape=("batch", "seq", D), opset=17, extra_inputs=(),
              extra_outputs=(), extra_inits=(), fc2_weight="w2"):
    w1 = RNG.normal(0, 0.2, (D, HIDDEN)).astype(np.float32)
    w2 = RNG.normal(0, 0.1, (HIDDEN, D)).astype(np.float32)
    nodes = ([node("MatMul", ["x", "w1"], ["h0"], name="fc1"), node("Add", ["h0", "b1"], ["h"], name="fc1_bias")]
             + list(activation)
             + [node("MatMul", ["a", fc2_weight], ["y0"], name="fc2"), node("Add", ["y0", "b2"], ["y"], name="fc2_bias")])
    used = {i for n in nodes for i in n.input}
    inits = [init("w1", w1), init("b1", RNG.normal(0, 0.1, HIDDEN).astype(np.float32)), init("w2", w2),
             init("b2", RNG.normal(0, 0.1, D).astype(np.float32))] + list(extra_inits)
    inits += [s for s in SCALARS if s.name in used]
    out_shape = list(x_shape[:-1]) + [D]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
                              + list(extra_inputs),
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)] + list(extra_outputs),
                              [i for i in inits if i.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def run_pass(model, **cfg):
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    return moe_mlp.run(graph, MoEMLPConfig(**cfg))


def moe(model, shift_linear=None, **cfg):
    return convert_onnx(model, ConvertConfig(shift_linear=shift_linear, add_attention=None, shift_conv=None,
                                             moe_mlp=MoEMLPConfig(**cfg)))


def run_ort(model, x, ours=True):
    data = model.SerializeToString()
    sess = session(data, threads=1) if ours else ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("form", list(ACTIVATIONS))
def test_every_activation_form_is_matched_and_forced_routings_are_exact(form):
    name, nodes = ACTIVATIONS[form]
    opset = 20 if form.startswith("gelu_op") else 17
    model = mlp_model(nodes, opset=opset)
    x = RNG.normal(0, 1, (2, 5, D)).astype(np.float32)

    mult = moe(model, router_std=0.0, router_bias=-FORCE)
    assert [c.node for c in mult.report.changes] == ["fc1", "fc2"]
    assert name in mult.report.changes[0].detail
    ops = [n.op_type for n in mult.model.graph.node]
    assert ops.count("ShiftLinear") == 2 and ops.count("Gemm") == 3 and "MatMul" not in ops
    # All-Mult: the float MLP (Gemm instead of MatMul+Add: float32 rounding only, measured ≤ 4e-7).
    np.testing.assert_allclose(run_ort(mult.model, x), run_ort(model, x, ours=False), rtol=0, atol=2e-6)

    # All-Shift: exactly what shift-linear makes of the same two linears.
    shift = moe(model, router_std=0.0, router_bias=FORCE)
    plain = convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None))
    np.testing.assert_array_equal(run_ort(shift.model, x), run_ort(plain.model, x))


def test_rank4_input_gemm_linears_and_zero_tokens():
    w1 = RNG.normal(0, 0.2, (HIDDEN, D)).astype(np.float32)       # Gemm transB=1: [out, in]
    w2 = RNG.normal(0, 0.1, (D, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [node("Flatten", ["x"], ["x2"], axis=1),
         node("Gemm", ["x2", "w1", "b1"], ["h"], name="fc1", transB=1, alpha=0.5),
         node("Relu", ["h"], ["a"]), node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
        [init("w1", w1), init("b1", RNG.normal(0, 0.1, (HIDDEN,)).astype(np.float32)), init("w2", w2),
         init("b2", RNG.normal(0, 0.1, (1, D)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = moe(model, router_std=0.0, router_bias=-FORCE)
    assert [c.node for c in result.report.changes] == ["fc1", "fc2"]
    x = RNG.normal(0, 1, (6, D)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result.model, x), run_ort(model, x, ours=False), atol=2e-6, rtol=0)
    assert run_ort(result.model, np.zeros((0, D), np.float32)).shape == (0, D)

    rank4 = mlp_model(ACTIVATIONS["relu"][1], x_shape=(2, 3, "w", D))
    result = moe(rank4)
    for shape in [(2, 3, 4, D), (2, 3, 0, D)]:
        x = RNG.normal(0, 1, shape).astype(np.float32)
        assert run_ort(result.model, x).shape == shape


@pytest.mark.parametrize("case,expect", [
    ("residual_add", None), ("gated", None), ("affine", "is none of GELU, GELU(tanh), SiLU, ReLU"),
    ("per_channel_scale", "has shape [64], not a scalar"), ("graph_output", "'t0' is a graph output"),
    ("fc1_output", "'h' is a graph output"), ("dynamic_fc2", "fc2 'fc2': no constant weight"), ("old_opset", "opset 12 < 13"),
])
def test_what_is_not_converted_and_why(case, expect):
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    gelu = ACTIVATIONS["gelu_erf_torch"][1]
    model = {
        "residual_add": lambda: mlp_model([node("Relu", ["h"], ["t0"]), node("Add", ["t0", "r"], ["a"])],
                                          extra_inputs=[f32("r", ["batch", "seq", HIDDEN])]),
        "gated": lambda: mlp_model([node("MatMul", ["x", "wg"], ["g"], name="gate"), node("Sigmoid", ["h"], ["t0"]),
                                    node("Mul", ["h", "t0"], ["t1"]), node("Mul", ["t1", "g"], ["a"])],
                                   extra_inits=[init("wg", RNG.normal(0, 1, (D, HIDDEN)).astype(np.float32))]),
        "affine": lambda: mlp_model([node("Mul", ["h", "half"], ["t0"]), node("Add", ["t0", "one"], ["a"])]),
        "per_channel_scale": lambda: mlp_model([node("Relu", ["h"], ["t0"]), node("Mul", ["t0", "scale"], ["a"])],
                                               extra_inits=[init("scale", np.ones(HIDDEN, np.float32))]),
        "graph_output": lambda: mlp_model([node("Sigmoid", ["h"], ["t0"]), node("Mul", ["h", "t0"], ["a"])],
                                          extra_outputs=[f32("t0", ["batch", "seq", HIDDEN])]),
        "fc1_output": lambda: mlp_model(ACTIVATIONS["relu"][1], extra_outputs=[f32("h", ["batch", "seq", HIDDEN])]),
        "dynamic_fc2": lambda: mlp_model(gelu, fc2_weight="w2_in", extra_inputs=[f32("w2_in", [HIDDEN, D])]),
        "old_opset": lambda: mlp_model(ACTIVATIONS["relu"][1], opset=12),
    }[case]()
    result = run_pass(model)
    assert result.changes == []
    if expect is None:
        assert result.skips == []          # not an MLP block at all: nothing to report
    else:
        (skip,) = result.skips
        assert skip.node == "fc1" and expect in skip.reason


def test_include_exclude_and_mult_expert_is_left_to_float_by_shift_linear():
    model = mlp_model(ACTIVATIONS["silu"][1])
    assert "excluded by --exclude" in run_pass(model, exclude=["^fc1$"]).skips[0].reason
    assert "not matched by --include" in run_pass(model, include=["nothing"]).skips[0].reason
    result = moe(model, shift_linear=ShiftLinearConfig(min_params=0))
    assert {r.pass_name: len(r.changes) for r in result.report.results} == {"moe-mlp": 2, "shift-linear": 0}
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Gemm") == 3 and ops.count("ShiftLinear") == 2   # router + Mult expert stay float
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props[moe_mlp.ROUTES_KEY] == '{"fc1": "fc1/moe/route"}'


def test_the_float_gemms_are_returned_as_claims_not_marked_on_the_graph():
    """The pass returns the Gemms it emitted (router, Mult expert) in PassResult.claims and leaves
    no mark on the graph; convert_onnx records them, so shift-linear after it leaves them float
    (the test above), and its report does not hold the graph's nodes."""
    model = mlp_model(ACTIVATIONS["silu"][1])
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    result = moe_mlp.run(graph, MoEMLPConfig())
    assert sorted(n.name for n in result.claims) == ["fc1/moe/mult.fc1", "fc1/moe/mult.fc2", "fc1/moe/router"]
    assert all(n.op == "Gemm" and any(n is m for m in graph.nodes) for n in result.claims)
    assert all(claimant(graph, n) is None for n in graph.nodes)
    converted = moe(model, shift_linear=ShiftLinearConfig(min_params=0))
    assert all(r.claims == [] for r in converted.report.results)


def test_cli_moe_mlp_flag(tmp_path):
    from typer.testing import CliRunner

    from mfconvert.cli.main import app
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(ACTIVATIONS["gelu_erf_torch"][1]), path)
    out = CliRunner().invoke(app, [str(path), "--moe-mlp", "--weight-bits", "4", "--shift-terms", "1", "--save-config",
                                   str(tmp_path / "cfg.json")])   # 1: no terms_by_node allocated
    assert out.exit_code == 0, out.output
    assert out.output.count("ShiftMoEMLP") == 2
    cfg = ConvertConfig.from_dict(json.loads((tmp_path / "cfg.json").read_text()))
    assert cfg.moe_mlp == MoEMLPConfig(weight_bits=4)
    assert (tmp_path / "mlp.mf.onnx").exists()
