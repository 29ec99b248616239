"""The AddLinearAttention C++ kernel against the PyTorch layer's core (docs/ops.md): random
inputs with masks, odd head sizes, one token, both binarisers, both convs, every ISA this CPU
has; and errors that name the node."""
import copy
import math
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mfconvert.nn import AddLinearAttention
from mfconvert.ort_ops import DOMAIN
from mfconvert.runtime import session
from tests.cpu_isas import supported_isas


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINFO_MIN = float(np.finfo(np.float32).min)


def op_inputs(consts: dict, with_k: bool, with_mask: bool) -> tuple[list[str], list]:
    """The node's input names (Q, K, V, mask, then the constant inputs 4–10, "" for an absent one,
    trailing ones dropped) and the constants as initializers c4…c10."""
    names = ["Q", "K" if with_k else "", "V", "mask" if with_mask else ""]
    inits = []
    for i in range(4, 11):
        names.append(f"c{i}" if i in consts else "")
        if i in consts:
            inits.append(numpy_helper.from_array(consts[i], f"c{i}"))
    while names[-1] == "":
        names.pop()
    return names, inits


def op_model(layer: AddLinearAttention, with_k=True, with_mask=True, attrs=None):
    names, inits = op_inputs(layer.onnx_constants(), with_k, with_mask)
    node = helper.make_node("AddLinearAttention", names, ["Y"], name="attn0", domain=DOMAIN,
                            **(attrs if attrs is not None else layer.onnx_attributes()))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:4] if n]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


# The kernel paths this CPU supports (MFCONVERT_ISA is read when the session creates the kernel):
# from the CPU's flags, not from trying them, so a path that fails fails every parity test.
ISAS = supported_isas()


def test_every_supported_isa_runs():
    x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype(np.float32)
    model = op_model(AddLinearAttention(8, 2, conv=None), with_mask=False)
    outs = [run_op(model, {"Q": x, "K": x, "V": x}, isa) for isa in ISAS]
    assert all(np.isfinite(y).all() and y.shape == x.shape for y in outs)
    for y in outs[1:]:       # float32 sums of 5 keys in another order: a few ulps of unit-norm rows
        np.testing.assert_allclose(y, outs[0], rtol=0, atol=1e-6)


def run_op(model, feeds, isa=None, threads=2):
    if isa:
        os.environ["MFCONVERT_ISA"] = isa
    try:
        return session(model.SerializeToString(), threads=threads).run(None, feeds)[0]
    finally:
        os.environ.pop("MFCONVERT_ISA", None)


def tolerance(layer, q, k, v, mask):
    """Per-element bound of docs/ops.md#parity: float32 sums of n = T + bits terms in another
    order (|err| ≤ n·2⁻²⁴·Σ|terms|), divided by ‖Z‖ through the normalisation, plus the conv's
    sum of |w·v| and a few ulps of the unit-norm output."""
    ref = copy.deepcopy(layer).double()
    with torch.no_grad():
        qh, vh = ref.heads(q.double()), ref.heads(v.double())
        kh = qh if k is None else ref.heads(k.double())
        bz = ref.binarizer
        if ref.binarizer_name == "sign":
            qb, kb = bz.codes(qh, bz.q_threshold), bz.codes(kh, bz.k_threshold)
        else:
            qb = kb = bz.codes(qh)
        from mfconvert.nn.add_attention import depthwise_conv, valid_keys
        keep = valid_keys(mask, q.shape[0], q.shape[1])
        if keep is not None:
            kb = kb * keep[:, None, :, None]
            vm = vh * keep[:, None, :, None]
        else:
            vm = vh
        z = 0.5 * vh + qb @ (kb.transpose(-2, -1) @ vh) / math.pi
        terms = 0.5 * vh.abs() + qb @ (kb.transpose(-2, -1) @ vh.abs()) / math.pi
        n = q.shape[1] + qb.shape[-1] + 4
        tol = n * 2.0 ** -24 * terms / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) + 2.0 ** -21
        if ref.conv_weight is not None:
            tol = tol + 16 * 2.0 ** -24 * depthwise_conv(vm.abs(), ref.conv_weight.abs(), ref.grid, ref.prefix_tokens)
    b, t, c = q.shape
    return tol.transpose(1, 2).reshape(b, t, c).float().numpy()


CASES = [  # binarizer, conv, B, T, H, D, mask[, token conv taps (default 9)]
    ("sign", "tokens", 2, 37, 3, 16, "half"),
    ("sign", None, 1, 1, 2, 5, None),               # one token, odd head size
    ("sign", "tokens", 3, 1, 1, 7, "all"),           # one token, every key masked
    ("sign", "tokens", 2, 70, 2, 65, "half"),        # D > 64: two code words per token
    ("ksh", "tokens", 2, 50, 2, 33, "half"),
    ("sign", "grid", 2, 17, 4, 8, "half"),           # class token + 4×4 grid
    ("sign", "tokens", 1, 300, 3, 64, None),
    ("sign", "tokens", 2, 300, 2, 64, "half"),       # two key chunks, masked keys across 64-key words
    ("sign", "tokens", 2, 90, 2, 24, "half", 41),    # 41 conv taps: more than one batch of 32 in registers
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_layer(case):
    binz, conv, b, t, h, d, masking, *taps = case
    c = h * d
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    layer = AddLinearAttention(c, h, binarizer=binz, conv=conv, grid=(4, 4), prefix_tokens=1,
                               conv_kernel=taps[0] if taps else 9)
    if binz == "ksh":
        layer.binarizer.iterations = 10      # fit quality is irrelevant to parity
    if conv:
        torch.nn.init.normal_(layer.conv_weight)
    q, k, v = (torch.from_numpy(rng.normal(size=(b, t, c)).astype(np.float32)) for _ in range(3))
    mask = None
    if masking:
        mask = torch.zeros(b, 1, 1, t)
        cut = 0 if masking == "all" else t // 2 + 1
        mask[0, ..., cut:] = FINFO_MIN                      # batch 0 padded, batch 1 not
    kin = None if binz == "ksh" else k
    with torch.no_grad():
        layer.core(q, kin, v, mask)                          # first forward fits the binariser
        if binz == "sign":
            layer.binarizer.q_threshold.normal_(0, 0.05)     # exercise non-zero thresholds
        expect = layer.core(q, kin, v, mask).numpy()
    tol = tolerance(layer, q, kin, v, mask)
    feeds = {"Q": q.numpy(), "V": v.numpy()}
    if kin is not None:
        feeds["K"] = k.numpy()
    if mask is not None:
        feeds["mask"] = mask.numpy()
    model = op_model(layer, with_k=kin is not None, with_mask=mask is not None)
    for isa in ISAS:
        got = run_op(model, feeds, isa)
        excess = np.abs(got - expect) - tol
        # Measured: max |diff| ≤ 1.9e-6 on these cases, at most 0.16 of the bound (ksh case).
        assert excess.max() <= 0, f"{isa}: {np.abs(got - expect).max()}"
    # Threads do not change the result (chunks are fixed, not per thread).
    np.testing.assert_array_equal(run_op(model, feeds, threads=1), run_op(model, feeds, threads=2))


def test_masked_keys_contribute_nothing():
    """Changing the values and keys of masked tokens leaves the unmasked rows unchanged."""
    torch.manual_seed(0)
    layer = AddLinearAttention(24, 3, conv="tokens")
    torch.nn.init.normal_(layer.conv_weight)
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(1, 20, 24)).astype(np.float32) for _ in range(3))
    mask = np.zeros((1, 20), np.float32)
    mask[0, 15:] = -1e4
    model = op_model(layer, attrs={"num_heads": 3})
    with torch.no_grad():
        layer.core(*(torch.from_numpy(x) for x in (q, k, v)))
    model = op_model(layer)
    a = run_op(model, {"Q": q, "K": k, "V": v, "mask": mask})
    k2, v2 = k.copy(), v.copy()
    k2[0, 15:] = rng.normal(size=(5, 24))
    v2[0, 15:] = 100 * rng.normal(size=(5, 24))
    b = run_op(model, {"Q": q, "K": k2, "V": v2, "mask": mask})
    # Unmasked rows are identical: masked keys are skipped and the conv reads V. = 0 there.
    np.testing.assert_array_equal(a[0, :15], b[0, :15])


def test_query_key_mask_with_equal_rows_is_the_key_mask():
    """A padding mask expanded over the queries ([B|1, 1, T, T], [B|1, T, T], as transformers ≥ 5
    builds it) gives exactly the result of the per-key mask; the layer agrees."""
    torch.manual_seed(0)
    layer = AddLinearAttention(24, 3, conv="tokens")
    torch.nn.init.normal_(layer.conv_weight)
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 9, 24)).astype(np.float32) for _ in range(3))
    key_mask = np.zeros((2, 1, 1, 9), np.float32)
    key_mask[1, ..., 6:] = FINFO_MIN
    with torch.no_grad():
        layer.core(*(torch.from_numpy(x) for x in (q, k, v)), torch.from_numpy(key_mask))
    model = op_model(layer)
    expect = run_op(model, {"Q": q, "K": k, "V": v, "mask": key_mask})
    expanded = np.broadcast_to(key_mask, (2, 1, 9, 9)).copy()
    expanded[0, 0, :, 3] = -5.0            # not masked (≥ −1000) in every row: still the same key mask
    feeds = {"Q": q, "K": k, "V": v}
    for mask in (expanded, expanded[:, 0]):
        np.testing.assert_array_equal(run_op(model, {**feeds, "mask": mask}), expect)
    np.testing.assert_array_equal(run_op(model, {**feeds, "mask": expanded[1:]}),     # [1, 1, T, T]: shared
                                  run_op(model, {**feeds, "mask": key_mask[1:]}))
    with torch.no_grad():
        torch.testing.assert_close(layer.core(*(torch.from_numpy(x) for x in (q, k, v)), torch.from_numpy(expanded)),
                                   layer.core(*(torch.from_numpy(x) for x in (q, k, v)), torch.from_numpy(key_mask)),
                                   rtol=0, atol=0)


def test_causal_mask_is_refused_at_run_time():
    """Linear attention has one key mask for all queries: a [T, T] mask whose rows differ
    (causal) fails in ORT naming the node; the layer raises the same error."""
    layer = AddLinearAttention(8, 2, conv=None)
    layer.binarizer.fitted.fill_(True)
    x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    causal = np.triu(np.full((4, 4), FINFO_MIN, np.float32), 1)
    padded = np.zeros((2, 1, 4, 4), np.float32)
    padded[1, 0, :, 3] = FINFO_MIN
    padded[1, 0, 2, 1] = FINFO_MIN          # one query row of batch item 1 differs
    for mask, where in ((causal[None, None], "query row 1 of batch item 0"), (causal[None], "query row 1 of batch item 0"),
                        (padded, "query row 2 of batch item 1")):
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                           match=f"node 'attn0': mask is not per key: {where} masks other keys than row 0"):
            run_op(op_model(layer), {"Q": x, "K": x, "V": x, "mask": mask})
        with pytest.raises(ValueError, match="is not per key: its query rows mask different keys"):
            layer.core(*(torch.from_numpy(a) for a in (x, x, x, mask)))


@pytest.mark.parametrize("feeds, attrs, message", [
    ({"Q": np.zeros((2, 3, 8), np.float32), "V": np.zeros((2, 4, 8), np.float32)}, {"num_heads": 2},
     "node 'attn0': V has shape \\[2, 4, 8\\], Q has \\[2, 3, 8\\]"),
    ({"Q": np.zeros((2, 3, 9), np.float32), "V": np.zeros((2, 3, 9), np.float32)}, {"num_heads": 2},
     "node 'attn0': C = 9 is not divisible by num_heads = 2"),
    ({"Q": np.zeros((3, 8), np.float32), "V": np.zeros((3, 8), np.float32)}, {"num_heads": 2},
     "node 'attn0': Q must be \\[B, T, C\\], got \\[3, 8\\]"),
    ({"Q": np.zeros((2, 3, 8), np.float32), "V": np.zeros((2, 3, 8), np.float32),
      "mask": np.zeros((2, 2, 3, 3), np.float32)}, {"num_heads": 2}, "node 'attn0': mask must be"),
    ({"Q": np.zeros((2, 3, 8), np.float32), "V": np.zeros((2, 3, 8), np.float32),
      "mask": np.zeros((2, 1, 2, 3), np.float32)}, {"num_heads": 2}, "node 'attn0': mask must be"),
    ({"Q": np.zeros((1, 3, 8), np.float32), "V": np.zeros((1, 3, 8), np.float32)}, {"num_heads": 2, "binarizer": "ksh"},
     "node 'attn0': binarizer 'ksh' needs hash_anchors"),
    ({"Q": np.zeros((1, 3, 8), np.float32), "V": np.zeros((1, 3, 8), np.float32)}, {"num_heads": 2, "binarizer": "xor"},
     "node 'attn0': binarizer must be 'sign' or 'ksh', got 'xor'"),
])
def test_errors_name_the_node(feeds, attrs, message):
    names = ["Q", "", "V", "mask" if "mask" in feeds else ""]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("AddLinearAttention", names, ["Y"], name="attn0", domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in feeds],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises((ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                        ort.capi.onnxruntime_pybind11_state.RuntimeException), match=message):
        run_op(model, feeds)


def test_grid_conv_needs_matching_token_count():
    layer = AddLinearAttention(8, 2, conv="grid", grid=(2, 2), prefix_tokens=1)
    model = op_model(layer, with_k=False, with_mask=False)
    x = np.zeros((1, 6, 8), np.float32)
    with pytest.raises(Exception, match="node 'attn0': a \\[H, kh, kw\\] conv_weight needs T = prefix_tokens"):
        run_op(model, {"Q": x, "V": x})


@pytest.mark.parametrize("d", [5, 16, 37, 65])
def test_sign_codes_without_thresholds(d):
    """No q_/k_threshold inputs (τ = 0): the kernels test x > 0 per lane (AVX-512: 16 at a time,
    masked tail; AVX2: 8), so head sizes around the vector widths, exact zeros of both signs and
    denormals must give the layer's codes on every ISA."""
    h, t = 2, 23
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    layer = AddLinearAttention(h * d, h, conv="tokens")
    torch.nn.init.normal_(layer.conv_weight)
    q, k, v = (rng.normal(size=(1, t, h * d)).astype(np.float32) for _ in range(3))
    for x in (q, k):
        x[0, ::3, ::4] = 0.0
        x[0, 1::3, ::5] = -0.0
        x[0, 2::3, ::7] = 1e-45
    with torch.no_grad():
        layer.binarizer.q_threshold.zero_()
        layer.binarizer.k_threshold.zero_()
        layer.binarizer.fitted.fill_(True)                 # keep τ = 0 (no fit on first use)
        expect = layer.core(*(torch.from_numpy(a) for a in (q, k, v)), None).numpy()
    tol = tolerance(layer, *(torch.from_numpy(a) for a in (q, k, v)), None)
    consts = {i: c for i, c in layer.onnx_constants().items() if i not in (5, 6)}
    names, inits = op_inputs(consts, with_k=True, with_mask=False)
    node = helper.make_node("AddLinearAttention", names, ["Y"], name="attn0", domain=DOMAIN, **layer.onnx_attributes())
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:4] if n]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    for isa in ISAS:
        got = run_op(model, {"Q": q, "K": k, "V": v}, isa)
        assert (np.abs(got - expect) - tol).max() <= 0, f"{isa}: {np.abs(got - expect).max()}"


def test_heads_of_64_with_overflowing_norms():
    """Heads of 64 channels, where the AVX-512 kernel keeps each row in registers from the gather
    to Y, two rows at a time: rows whose ‖Z‖² overflows float32 (|Z| above ~1.8e19) take the
    rescaled norm, whichever row of a pair they are (token 6 is the odd last one), and the other
    rows are unchanged; against the float64 NumPy reference, every ISA, with a token conv."""
    from tests import numpy_reference as ref
    rng = np.random.default_rng(7)
    t, h, d = 7, 2, 64
    q, k, v = (rng.standard_normal((1, t, h * d)).astype(np.float32) for _ in range(3))
    v[0, 2, 5], v[0, 3, 70], v[0, 6, 64] = 1e25, -4e24, 2e20   # sums stay finite, squares do not
    k[0, 2, :d], k[0, 3, d:], k[0, 6, d:] = -1, -1, -1          # key codes 0: these V rows stay out of S,
    # so only Z of token 2 (head 0) and of tokens 3 and 6 (head 1) overflows: pairs (2, 3) mixed
    conv = (0.1 * rng.standard_normal((h, 3))).astype(np.float32)
    expect = ref.add_linear_attention(q, k, v, h, conv_weight=conv)
    node = helper.make_node("AddLinearAttention", ["Q", "K", "V", "", "conv"], ["Y"], domain=DOMAIN, num_heads=h)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "QKV"],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(conv, "conv")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    for isa in ISAS:
        y = run_op(model, {"Q": q, "K": k, "V": v}, isa)
        # Unit-norm rows plus conv taps of up to 0.1 * 1e25 near the huge tokens: float32 rounding.
        np.testing.assert_allclose(y, expect, rtol=2e-6, atol=2e-6, err_msg=isa)
        assert np.abs(y[0, [2, 3, 6]]).max() > 0.5 and np.isfinite(y).all()
