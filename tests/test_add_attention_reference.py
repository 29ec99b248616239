"""AddLinearAttention's C++ kernel (every ISA this CPU supports) and PyTorch layer against
tests/numpy_reference.add_linear_attention, a float64 statement of docs/ops.md written without
our layer: codes exactly, outputs within a bound derived from float32 accumulation."""
import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from mfconvert.nn import AddLinearAttention
from mfconvert.ort_ops import DOMAIN
from tests import numpy_reference as ref
from tests.test_add_attention_kernel import ISAS, op_inputs, run_op

pytestmark = pytest.mark.usefixtures("one_torch_thread")
U = 2.0 ** -24          # float32 unit roundoff

CASES = {   # binarizer, conv, B, T, H, D, mask
    "sign-tokens-mask": ("sign", "tokens", 2, 41, 3, 16, "keys"),
    "sign-qk-mask": ("sign", "tokens", 2, 23, 2, 12, "query×key"),
    "sign-D65-nomask": ("sign", None, 1, 70, 2, 65, None),
    "sign-grid-prefix": ("sign", "grid", 2, 17, 4, 8, "keys"),
    "sign-one-token-all-masked": ("sign", "tokens", 1, 1, 1, 7, "all"),
    "ksh-tokens-mask": ("ksh", "tokens", 2, 30, 2, 24, "keys"),
}


def make_case(name):
    binz, conv, b, t, h, d, masking = CASES[name]
    c = h * d
    rng = np.random.default_rng(sum(map(ord, name)))
    q, k, v = (rng.standard_normal((b, t, c)).astype(np.float32) for _ in range(3))
    consts, attrs = {}, {"num_heads": h, "binarizer": binz}
    if conv == "tokens":
        consts[4] = (0.3 * rng.standard_normal((h, 5))).astype(np.float32)
    elif conv == "grid":
        consts[4] = (0.3 * rng.standard_normal((h, 3, 3))).astype(np.float32)
        attrs.update(grid_h=4, grid_w=4, prefix_tokens=1)
    if binz == "sign":
        consts[5] = (0.1 * rng.standard_normal((h, d))).astype(np.float32)
        consts[6] = (0.1 * rng.standard_normal((h, d))).astype(np.float32)
    else:
        m, nbits = 9, 12
        anchors = rng.standard_normal((h, m, d))
        consts[7] = (anchors / np.linalg.norm(anchors, axis=-1, keepdims=True)).astype(np.float32)
        consts[8] = rng.uniform(0.2, 0.6, (h, m)).astype(np.float32)
        consts[9] = rng.standard_normal((h, nbits, m)).astype(np.float32)
        consts[10] = rng.uniform(0.5, 1.5, h).astype(np.float32)
    mask = None
    if masking == "keys":        # threshold −1000: −1000.5 masks, −999.5 does not
        mask = np.zeros((b, 1, 1, t), np.float32)
        mask[0, ..., t // 2:] = np.float32(np.finfo(np.float32).min)
        mask[-1, ..., 1::4] = -999.5
        mask[-1, ..., 2::4] = -1000.5
    elif masking == "query×key":
        keys = np.where(rng.random((b, t)) < 0.3, np.float32(-1e4), np.float32(0))
        mask = np.broadcast_to(keys[:, None, None, :], (b, 1, t, t)).copy()
        # Rows may differ above −1000 (ignored); the masked keys are the same in every row.
        mask += np.where(mask < -1000, 0, rng.uniform(-900, 0, mask.shape)).astype(np.float32)
    elif masking == "all":
        mask = np.full((b, t), -1e4, np.float32)
    return dict(q=q, k=None if binz == "ksh" else k, v=v, mask=mask, consts=consts, attrs=attrs, h=h, d=d)


def reference(case, parts=False):
    cs = case["consts"]
    ksh = tuple(cs[i] for i in (7, 8, 9, 10)) if 7 in cs else None
    a = case["attrs"]
    return ref.add_linear_attention(case["q"], case["k"], case["v"], case["h"], case["mask"], cs.get(4),
                                    cs.get(5), cs.get(6), ksh, (a.get("grid_h"), a.get("grid_w")),
                                    a.get("prefix_tokens", 0), parts=parts)


def bound(case):
    """Per-element bound on |float32 result − float64 reference| (first order in U):
    S and U are sums of at most T and `bits` terms: in any order |err| ≤ (T + bits)·U·M, M the same
    sums of |V|; Z = 0.5·V + U·(1/π) adds 3 roundings: err_Z ≤ (T + bits + 3)·U·A with A = 0.5|V| +
    M/π. Dividing by ‖Z‖ (itself a float32 sum of D squares and a sqrt: relative error ≤ (D + 3)·U,
    plus ‖err_Z‖ from Z) bounds the attention part by err_Z/‖Z‖ + ‖err_Z‖/‖Z‖ + (D + 3)·U (|y| ≤ 1);
    the conv sums k products: (k + 1)·U·Σ|w·V'|, and the final add one rounding of |Y|."""
    y, p = reference(case, parts=True)
    t = case["v"].shape[1]
    err_z = (t + p["bits"] + 3) * U * p["magnitude"]
    attn = (err_z + np.sqrt(np.square(err_z).sum(-1, keepdims=True))) / np.maximum(p["znorm"], 1e-12) \
        + (case["d"] + 3) * U
    taps = case["consts"][4][0].size if 4 in case["consts"] else 0
    tol = attn + (taps + 1) * U * p["conv_abs"]
    b, h, t, d = tol.shape
    return y, tol.transpose(0, 2, 1, 3).reshape(b, t, h * d) + U * np.abs(y)


def node_model(case):
    names, inits = op_inputs(case["consts"], case["k"] is not None, case["mask"] is not None)
    node = helper.make_node("AddLinearAttention", names, ["Y"], name="attn0", domain=DOMAIN, **case["attrs"])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:4] if n]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def feeds(case):
    out = {"Q": case["q"], "V": case["v"]}
    if case["k"] is not None:
        out["K"] = case["k"]
    if case["mask"] is not None:
        out["mask"] = case["mask"]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_numpy_reference(name):
    case = make_case(name)
    expect, tol = bound(case)
    model = node_model(case)
    for isa in ISAS:
        got = run_op(model, feeds(case), isa)
        diff = np.abs(got.astype(np.float64) - expect)
        # Measured: max |diff| 2.4e-7, at most 0.033 of the bound, the same on every ISA; a code bit
        # or a mask decision off moves a row by ~0.1, 1/π 1 % too large by ~1e-3.
        assert (diff <= tol).all(), f"{isa}: max |diff| {diff.max():.3g}, max diff/bound {(diff / tol).max():.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_numpy_reference(name):
    """The PyTorch layer loaded from the node (AddLinearAttention.from_onnx): its codes equal the
    reference's bit for bit, its output is within the same bound."""
    case = make_case(name)
    expect, tol = bound(case)
    h, d = case["h"], case["d"]
    layer = AddLinearAttention.from_onnx(h * d, case["attrs"], case["consts"], key_input=case["k"] is not None)
    q, v = torch.from_numpy(case["q"]), torch.from_numpy(case["v"])
    k = None if case["k"] is None else torch.from_numpy(case["k"])
    mask = None if case["mask"] is None else torch.from_numpy(case["mask"])
    with torch.no_grad():
        got = layer.core(q, k, v, mask).numpy()
        bz = layer.binarizer
        if layer.binarizer_name == "sign":
            codes = bz.codes(layer.heads(q), bz.q_threshold).numpy()
            expect_codes = ref.sign_codes(ref_heads(case["q"], h), case["consts"][5])
            kcodes = bz.codes(layer.heads(k), bz.k_threshold).numpy()
            np.testing.assert_array_equal(kcodes, ref.sign_codes(ref_heads(case["k"], h), case["consts"][6]))
        else:
            codes = bz.codes(layer.heads(q)).numpy()
            expect_codes = ref.ksh_codes(ref_heads(case["q"], h), *(case["consts"][i] for i in (7, 8, 9, 10)))
    np.testing.assert_array_equal(codes, expect_codes)
    assert expect_codes.size < 50 or 0.2 < expect_codes.mean() < 0.8     # informative codes, not constant
    diff = np.abs(got.astype(np.float64) - expect)
    assert (diff <= tol).all(), f"max |diff| {diff.max():.3g}, max diff/bound {(diff / tol).max():.3g}"


def ref_heads(x, h):
    b, t, c = x.shape
    return x.reshape(b, t, h, c // h).transpose(0, 2, 1, 3)


def test_reference_is_the_spec_on_a_hand_case():
    """The reference itself on one head by hand: D = 2, three tokens, key 2 masked, no conv."""
    q = np.array([[[1.0, -1.0], [2.0, 1.0], [-1.0, -3.0]]], np.float32)
    k = np.array([[[1.0, 1.0], [-1.0, 2.0], [5.0, 5.0]]], np.float32)
    v = np.array([[[1.0, 0.0], [0.0, 2.0], [7.0, 7.0]]], np.float32)
    mask = np.array([[0.0, 0.0, -1e4]], np.float32)
    y = ref.add_linear_attention(q, k, v, 1, mask)
    # Codes 1[x̂ > 0]: q → [1,0], [1,1], [0,0]; k → [1,1], [0,1], (masked).
    # S = kᵀV over keys 0, 1: row 0 = v0 = [1, 0]; row 1 = v0 + v1 = [1, 2].
    s = np.array([[1.0, 0.0], [1.0, 2.0]])
    u = np.array([s[0], s[0] + s[1], [0.0, 0.0]])
    z = 0.5 * v[0] + u / math.pi
    np.testing.assert_allclose(y[0], z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-12)
