"""The shift-linear pass with non-default formats (weight bits, narrow activations, weight
scale, terms): the converted graph in ORT equals tests/numpy_reference bit for bit, so every
format field the pass must write into the node (weight_bits, act_bits, act_frac_bits, terms)
and every exponent rule is checked by its effect."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.runtime import session
from tests import numpy_reference as ref

FORMATS = [  # weight_bits, act_bits, act_frac_bits, weight_scale, terms
    (4, 16, 10, "channel", 1),
    (3, 12, 6, "tensor", 1),
    (5, 32, 12, "none", 1),
    (4, 24, 14, "channel", 2),
]


def exponents(w_out_in, scale):
    if scale == "channel":
        return ref.channel_exponent(w_out_in)
    if scale == "tensor":
        return np.full(len(w_out_in), ref.channel_exponent(w_out_in.reshape(1, -1))[0], np.int8)
    return np.zeros(len(w_out_in), np.int8)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
def test_pass_with_format_matches_numpy_reference(fmt):
    bits, act_bits, frac, scale, terms = fmt
    rng = np.random.default_rng(bits * 100 + act_bits)
    w = (rng.standard_normal((40, 24)) * rng.uniform(0.05, 0.8, 24)).astype(np.float32)   # [in, out]
    b = rng.standard_normal(24).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cfg = ShiftLinearConfig(weight_bits=bits, act_bits=act_bits, act_frac_bits=frac, weight_scale=scale,
                            terms=terms, min_params=0)
    converted = convert_onnx(model, ConvertConfig(shift_linear=cfg, add_attention=None)).model
    assert [n.op_type for n in converted.graph.node] == ["ShiftLinear"]
    x = (rng.standard_normal((33, 40)) * 3).astype(np.float32)
    x[0, :4] = [2.0 ** (act_bits - frac), -(2.0 ** (act_bits - frac)), 1e6, -1e6]   # saturate
    got = session(converted.SerializeToString(), threads=1).run(None, {"x": x})[0]

    w_out_in = w.T
    exponent = exponents(w_out_in, scale)
    codes = ref.round_weight_terms(w_out_in, exponent, bits, terms)
    # The op with T terms is the one-term op over X repeated T times (docs/ops.md): one reference
    # call over the concatenated codes, the bias added once.
    sign = np.concatenate([s for s, _ in codes], axis=1)
    m = np.concatenate([m for _, m in codes], axis=1)
    expect = ref.shift_linear(np.tile(x, terms), sign, m, exponent, b, bits, act_bits, frac)
    np.testing.assert_array_equal(got, expect)
    attrs = {a.name: helper.get_attribute_value(a) for a in converted.graph.node[0].attribute}
    assert (attrs["weight_bits"], attrs["act_bits"], attrs["act_frac_bits"], attrs.get("terms", 1)) == \
        (bits, act_bits, frac, terms)
    onnx.checker.check_model(converted)
