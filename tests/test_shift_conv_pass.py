"""Pass shift-conv: which convs it converts (BatchNormalization, bias Add and Pad folded, auto_pad
resolved, weights from initializers, Constant nodes and foldable subgraphs), what it skips and why,
and that the rewritten graph computes the original convolution: with the ShiftConv nodes replaced
by float Convs of their decoded weights (standard ONNX, run in ONNX Runtime), each output is within
the bound the weight rounding allows, conv(|x|, |ŵ − w|), where w is the folded weight computed
here in NumPy from the original's parameters."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.nn import pow2
from mfconvert.passes.conv import ShiftConvConfig, conv_weight_matrix

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
    return convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None,
                                             shift_conv=ShiftConvConfig(**cfg)), allow_unchanged=True)


def decoded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every ShiftConv node replaced by a float Conv of its decoded weights
    (w = Σ_t (−1)^s·2^(e−m), 0 for the zero code: docs/ops.md#weight-codes-shiftconv)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    after = []
    for node in out.graph.node:
        if node.op_type != "ShiftConv":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        bits, terms, m = a.get("weight_bits", 5), a.get("terms", 1), a["out_channels"]
        exponent = inits[node.input[2]].astype(np.float64)
        per_row = inits[node.input[1]].size * 8 // bits // (terms * m)   # the last byte's spare bits hold < 1 row
        codes = pow2.unpack_codes(inits[node.input[1]], terms * m * per_row, bits).astype(np.int64)
        codes = codes.reshape(terms, m, per_row)
        z = 2 ** (bits - 1) - 1
        shift, sign = codes & z, codes >> (bits - 1)
        w = np.where(shift == z, 0.0, (1 - 2 * sign) * 2.0 ** (exponent[None, :, None] - shift)).sum(0)
        k = list(a["kernel_shape"])
        w = w.reshape(m, -1, *k).astype(np.float32)
        name = node.name + ".decoded"
        out.graph.initializer.append(numpy_helper.from_array(w, name))
        node.op_type, node.domain = "Conv", ""
        node.input[1] = name
        del node.input[2]
        keep = {k_: a[k_] for k_ in ("kernel_shape", "strides", "pads", "dilations", "group")}
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k_, v) for k_, v in keep.items())
        if a.get("activation"):   # the fused activation, after the conv
            y = node.output[0]
            node.output[0] = y + ".pre"
            if a["activation"] == b"Relu":
                after.append(helper.make_node("Relu", [y + ".pre"], [y]))
            else:
                bounds = [node.name + ".min", node.name + ".max"]
                out.graph.initializer.extend(numpy_helper.from_array(np.float32(a[k_]), n_) for k_, n_ in
                                             (("clip_min", bounds[0]), ("clip_max", bounds[1])))
                after.append(helper.make_node("Clip", [y + ".pre", *bounds], [y]))
    out.graph.node.extend(after)
    nodes = list(out.graph.node)          # back in a topological order: each activation after its conv
    order = []
    for n in nodes:
        if n not in after:
            order.append(n)
            order += [m for m in after if m.input[0] == n.output[0]]
    del out.graph.node[:]
    out.graph.node.extend(order)
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import if o.domain == "")
    return out


def ort_run(model, feeds):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def shift_weights(model) -> dict:
    """{node name: decoded weight} of the ShiftConv nodes (via decoded())."""
    dec = decoded(model)
    inits = {i.name: numpy_helper.to_array(i) for i in dec.graph.initializer}
    return {n.name: inits[n.input[1]] for n in dec.graph.node if n.name and n.name + ".decoded" in n.input}


def conv64(x, w, pads, strides=1, dilations=1, group=1):
    """Float64 conv with explicit [begin…, end…] pads (torch), as NumPy."""
    d = w.ndim - 2
    order = [v for i in reversed(range(d)) for v in (pads[i], pads[d + i])]
    fn = F.conv2d if d == 2 else F.conv1d
    return fn(F.pad(torch.from_numpy(np.asarray(x, np.float64)), order), torch.from_numpy(np.asarray(w, np.float64)),
              stride=strides, dilation=dilations, groups=group).numpy()


def assert_within_rounding(y, y_ref, x, w_hat, w_true, pads, strides=1, dilations=1, group=1):
    """|y − y_ref| ≤ conv(|x|, |ŵ − w|) per output (+ float32 evaluation error of both sides)."""
    bound = conv64(np.abs(x), np.abs(w_hat - w_true), pads, strides, dilations, group)
    slack = 1e-5 * (conv64(np.abs(x), np.abs(w_true), pads, strides, dilations, group) + 1e-3)
    excess = np.abs(y.astype(np.float64) - y_ref) - bound - slack
    assert excess.max() <= 0, f"worst excess {excess.max()}"
    assert bound.max() > 0


def bn_params(m, seed):
    r = np.random.default_rng(seed)
    return (r.uniform(0.5, 2, m), r.normal(0, 0.5, m), r.normal(0, 0.5, m), r.uniform(0.2, 3, m))


def bn_folded(w, b, gamma, beta, mean, var, eps):
    s = gamma / np.sqrt(var + eps)
    return w * s.reshape(-1, *[1] * (w.ndim - 1)), (b - mean) * s + beta


@pytest.mark.parametrize("terms", [1, 4])
def test_conv_bn_relu_folds_and_matches_within_rounding(terms):
    w = RNG.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32)
    b = RNG.normal(0, 0.1, 8).astype(np.float32)
    gamma, beta, mean, var = (p.astype(np.float32) for p in bn_params(8, 1))
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
                        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["n"], name="bn",
                                     epsilon=1e-3),
                        helper.make_node("Relu", ["n"], ["y"], name="relu")],
                       [f32("x", ["N", 3, 9, 10])], [f32("y", ["N", 8, 5, 5])],
                       [init("w", w), init("b", b), init("g", gamma), init("be", beta), init("mu", mean), init("var", var)])
    result = convert(model, terms=terms)
    assert ops(result.model) == ["ShiftConv"]
    (change,) = result.report.changes
    assert (change.node, change.in_features, change.out_features) == ("conv", 27, 8)
    assert "BatchNormalization" in change.detail and "Relu fused" in change.detail
    x = RNG.normal(0, 1, (2, 3, 9, 10)).astype(np.float32)
    y = ort_run(decoded(result.model), {"x": x})
    y_ref = ort_run(model, {"x": x})
    w_true, _ = bn_folded(w.astype(np.float64), b.astype(np.float64), *(p.astype(np.float64) for p in
                                                                        (gamma, beta, mean, var)), 1e-3)
    w_hat = shift_weights(result.model)["conv"]
    assert_within_rounding(y, y_ref, x, w_hat, w_true, [1, 1, 1, 1], strides=2)
    if terms == 4:   # four terms hold the folded weights closely: BN folding is exact up to rounding
        assert np.abs(w_hat - w_true).max() <= 2.0 ** -8 * np.abs(w_true).max()


def test_explicit_pad_absorbed_and_auto_pad_resolved():
    """A TF-style Pad → Conv(VALID) → Conv(SAME_UPPER, stride 2) → Conv(SAME_LOWER, 2×2)."""
    w1 = RNG.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w3 = RNG.normal(0, 0.3, (3, 4, 2, 2)).astype(np.float32)
    model = make_model([
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad", mode="constant"),
        helper.make_node("Conv", ["xp", "w1"], ["h1"], name="c1", auto_pad="VALID"),
        helper.make_node("Conv", ["h1", "w2"], ["h2"], name="c2", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Conv", ["h2", "w3"], ["y"], name="c3", auto_pad="SAME_LOWER")],
        [f32("x", [1, 2, 10, 9])], [f32("y", [1, 3, 6, 5])],
        [init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64)), init("w1", w1), init("w2", w2), init("w3", w3)])
    result = convert(model, terms=4)
    assert ops(result.model) == ["ShiftConv"] * 3
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in result.model.graph.node}
    assert attrs["c1"]["pads"] == [1, 2, 2, 0]
    # h1 is 11×9: SAME with stride 2 gives 6×5, total pads 11−(−6·2…): (6−1)·2+3−11 = 2, (5−1)·2+3−9 = 2
    assert attrs["c2"]["pads"] == [1, 1, 1, 1]
    # h2 is 6×5, 2×2 stride 1: total pad 1 per axis, the odd one at the beginning for SAME_LOWER
    assert attrs["c3"]["pads"] == [1, 1, 0, 0]
    x = RNG.normal(0, 1, (1, 2, 10, 9)).astype(np.float32)
    y = ort_run(decoded(result.model), {"x": x})
    y_ref = ort_run(model, {"x": x})
    assert y.shape == y_ref.shape == (1, 3, 6, 5)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=0.01 * np.abs(y_ref).max())   # four terms: ≲ 1 %


def test_depthwise_bn_constant_node_weight_and_foldable_subgraph():
    """Depthwise conv whose weight is a Constant node, BN folded; a 1-D conv (stride 2, dilation 2)
    whose weight is Transpose(initializer) with a per-channel bias Add after it."""
    wd = RNG.normal(0, 0.3, (6, 1, 3, 3)).astype(np.float32)
    gamma, beta, mean, var = (p.astype(np.float32) for p in bn_params(6, 2))
    w1 = RNG.normal(0, 0.3, (5, 4, 3)).astype(np.float32)      # stored as [4, 5, 3], transposed back
    bias = RNG.normal(0, 0.3, (1, 5, 1)).astype(np.float32)
    dw = make_model([
        helper.make_node("Constant", [], ["wd"], value=numpy_helper.from_array(wd)),
        helper.make_node("Conv", ["x", "wd"], ["c"], name="dw", group=6, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"], name="bn")],
        [f32("x", ["N", 6, 8, 7])], [f32("y", ["N", 6, 4, 4])],
        [init("g", gamma), init("be", beta), init("mu", mean), init("var", var)])
    result = convert(dw, terms=1)
    assert ops(result.model) == ["ShiftConv"]
    assert "depthwise" in result.report.changes[0].detail
    x = RNG.normal(0, 1, (2, 6, 8, 7)).astype(np.float32)
    w_true, _ = bn_folded(wd.astype(np.float64), 0.0, *(p.astype(np.float64) for p in (gamma, beta, mean, var)), 1e-5)
    assert_within_rounding(ort_run(decoded(result.model), {"x": x}), ort_run(dw, {"x": x}), x,
                           shift_weights(result.model)["dw"], w_true, [1, 1, 1, 1], strides=2, group=6)

    one_d = make_model([
        helper.make_node("Transpose", ["w1t"], ["w1"], perm=[1, 0, 2]),
        helper.make_node("Conv", ["x", "w1"], ["c"], name="c1d", pads=[2, 1], strides=[2], dilations=[2]),
        helper.make_node("Add", ["c", "b"], ["y"], name="bias")],
        [f32("x", ["N", 4, 15])], [f32("y", ["N", 5, 7])], [init("w1t", w1.transpose(1, 0, 2)), init("b", bias)])
    result = convert(one_d, terms=2)
    assert ops(result.model) == ["ShiftConv"]
    assert "bias Add" in result.report.changes[0].detail
    x = RNG.normal(0, 1, (3, 4, 15)).astype(np.float32)
    assert_within_rounding(ort_run(decoded(result.model), {"x": x}), ort_run(one_d, {"x": x}), x,
                           shift_weights(result.model)["c1d"], w1, [2, 1], strides=2, dilations=2)


def test_skips_name_their_reason():
    w = RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w3 = RNG.normal(0, 0.3, (4, 4, 1, 1, 1)).astype(np.float32)
    model = make_model([
        helper.make_node("Conv", ["x", "wx"], ["a"], name="dynamic_w", pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["a", "pads"], ["ap"], name="reflect", mode="reflect"),
        helper.make_node("Conv", ["ap", "w"], ["b"], name="after_reflect"),
        helper.make_node("Conv", ["b", "w"], ["c"], name="same_unknown", auto_pad="SAME_UPPER"),
        helper.make_node("Unsqueeze", ["c", "axis"], ["c5"]),
        helper.make_node("Conv", ["c5", "w3"], ["y"], name="conv3d")],
        [f32("x", ["N", 4, "H", "W"]), f32("wx", [4, 4, 3, 3])], [f32("y", ["N", 4, "H", "W", 1])],
        [init("w", w), init("w3", w3), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
         init("axis", np.array([4], np.int64))])
    result = convert(model)
    skips = {s.node: s.reason for s in result.report.skips}
    assert "no constant weight" in skips["dynamic_w"]
    assert "auto_pad SAME_UPPER with input spatial dims unknown" in skips["same_unknown"]
    assert "3-D convolution" in skips["conv3d"]
    # The reflect Pad is not absorbed: the conv after it converts and reads the padded tensor.
    assert [c.node for c in result.report.changes] == ["after_reflect"]
    assert "Pad" in ops(result.model)


def test_exclude_and_weight_matrix_adapter():
    w = RNG.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(conv_weight_matrix(w)[1], w[1].reshape(-1))   # row o: (c, tap) order
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="stem", pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["h", "w2"], ["y"], name="head")],
                       [f32("x", [1, 2, 5, 5])], [f32("y", [1, 4, 5, 5])],
                       [init("w", w), init("w2", RNG.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32))])
    result = convert(model, exclude=["^stem$"])
    assert [c.node for c in result.report.changes] == ["head"]
    assert "excluded" in {s.node: s.reason for s in result.report.skips}["stem"]
    assert ops(result.model) == ["Conv", "ShiftConv"]


@pytest.mark.parametrize("terms", [1, 2])
def test_converted_cnn_runs_in_ort_bit_exact_with_the_layer(terms):
    """A MobileNet-like graph (Conv+BN+Clip, depthwise stride 2, pointwise) converted and run in
    ONNX Runtime with our kernel equals nn.ShiftConv (through OnnxModule) bit for bit, and stays
    near the original: a relative L2 error of the order of the weights' own (their NSR: one term
    ~0.2–0.3, two terms ~0.05; measured 0.24 and 0.054 on this seed)."""
    from mfconvert.nn.onnx_module import OnnxModule
    from mfconvert.runtime import session

    def cbr(name, x, cin, cout, k, stride, group, seed):
        r = np.random.default_rng(seed)
        w = r.normal(0, (2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k)).astype(np.float32)
        g, be, mu, var = (p.astype(np.float32) for p in bn_params(cout, seed))
        nodes = [helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.c"], name=name, group=group, strides=[stride] * 2,
                                  pads=[k // 2] * 4),
                 helper.make_node("BatchNormalization", [f"{name}.c", f"{name}.g", f"{name}.be", f"{name}.mu",
                                                         f"{name}.var"], [f"{name}.n"]),
                 helper.make_node("Clip", [f"{name}.n", "zero", "six"], [f"{name}.y"])]
        inits = [init(f"{name}.{k_}", v) for k_, v in (("w", w), ("g", g), ("be", be), ("mu", mu), ("var", var))]
        return nodes, inits, f"{name}.y"

    nodes, inits, x = [], [init("zero", np.float32(0)), init("six", np.float32(6))], "x"
    for i, (cin, cout, k, s, g) in enumerate([(3, 8, 3, 2, 1), (8, 8, 3, 1, 8), (8, 16, 1, 1, 1), (16, 16, 3, 2, 16)]):
        n, i_, x = cbr(f"b{i}", x, cin, cout, k, s, g, i)
        nodes += n
        inits += i_
    model = make_model(nodes, [f32("x", ["N", 3, 15, 16])], [f32(x, ["N", 16, 4, 4])], inits)
    result = convert(model, terms=terms)
    assert ops(result.model) == ["ShiftConv"] * 4            # BatchNormalization folded, ReLU6 fused
    feed = RNG.normal(0, 1, (2, 3, 15, 16)).astype(np.float32)
    y = session(result.model.SerializeToString(), threads=1).run(None, {"x": feed})[0]
    with torch.no_grad():
        y_layer = OnnxModule(result.model).eval()(x=torch.from_numpy(feed))[0].numpy()
    np.testing.assert_array_equal(y, y_layer)
    y_ref = ort_run(model, {"x": feed})
    error = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert error < (0.5 if terms == 1 else 0.1), error
