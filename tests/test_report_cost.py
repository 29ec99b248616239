"""The report's operation counts (passes/cost.py) against an independent count: a scalar NumPy
interpreter that executes each op's definition (docs/ops.md; the conv ops' agreed spec) one
operation at a time and counts what it executes, checked against ONNX Runtime's outputs where
our kernel exists, so the counted arithmetic is the arithmetic the op performs. Also the weight
SQNR (against nn/pow2.py's decoding), the JSON fields and the --report-html page."""
import json
import math
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.cli.main import app
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.passes.cost import ENERGY_PJ, model_costs
from mfconvert.passes.moe_mlp import MoEMLPConfig
from mfconvert.passes.report_html import render
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.runtime import session

F32 = np.float32


# --- the interpreter --------------------------------------------------------------------------
def codes_of(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes from the packed stream, one bit at a time (LSB first), written here on purpose."""
    stream = np.unpackbits(packed.reshape(-1), bitorder="little")
    return np.array([sum(int(stream[j * bits + b]) << b for b in range(bits)) for j in range(count)])


def quantise(x: float, frac_bits: int, act_bits: int) -> int:
    f = math.floor(F32(x) * F32(2.0 ** frac_bits))
    return int(min(max(f, -(2 ** (act_bits - 1))), 2 ** (act_bits - 1) - 1))


def wrap32(v: int) -> int:
    return (v + 2 ** 31) % 2 ** 32 - 2 ** 31


def matmul_counted(a, b, n: Counter, bias=None):
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float64)
    for r in range(a.shape[0]):
        for o in range(b.shape[1]):
            acc = 0.0
            for k in range(a.shape[1]):
                acc += float(a[r, k]) * float(b[k, o])
                n["fp32_mul"] += 1
                n["fp32_add"] += 1
            if bias is not None:
                acc += float(bias[o])
                n["fp32_add"] += 1
            out[r, o] = acc
    return out.astype(F32)


def shift_linear_counted(x, node, inits, n: Counter):
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n_in, n_out, bits, terms = at["in_features"], at["out_features"], at.get("weight_bits", 5), at.get("terms", 1)
    fb, ab = at.get("act_frac_bits", 16), at.get("act_bits", 32)
    codes = codes_of(inits[node.input[1]], bits, terms * n_out * n_in).reshape(terms, n_out, n_in)
    exps = inits[node.input[2]].astype(int)
    bias = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    zero = 2 ** (bits - 1) - 1
    rows = x.reshape(-1, n_in)
    y = np.zeros((len(rows), n_out), dtype=F32)
    for r, row in enumerate(rows):
        xq = [quantise(v, fb, ab) for v in row]
        n["shift"] += n_in
        for o in range(n_out):
            acc = 0
            for t in range(terms):
                for i in range(n_in):
                    c = int(codes[t, o, i])
                    if c & zero == zero:
                        continue
                    v = xq[i] >> (c & zero)
                    n["shift"] += 1
                    acc += -v if c >> (bits - 1) else v
                    n["int32_add"] += 1
            val = F32(wrap32(acc)) * F32(2.0 ** (exps[o] - fb))
            n["shift"] += 1
            if bias is not None:
                val = F32(val + bias[o])
                n["fp32_add"] += 1
            y[r, o] = val
    return y.reshape(*x.shape[:-1], n_out)


def by_kind(figures: dict) -> dict:
    return {k: v for k, v in figures["by_kind"].items() if v}


# --- ShiftLinear and the float linears it replaced ------------------------------------------
@pytest.fixture
def mlp():
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, .1, (6, 5)).astype(F32)
    w1[0, :3] = 0.0            # zero codes
    w1[1, 0] = 1e-9            # flushed to the zero code
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, .1, 5).astype(F32), "b1"),
             numpy_helper.from_array(rng.normal(0, .1, (5, 4)).astype(F32), "w2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("terms", [1, 2])
def test_shift_linear_counts_equal_the_executed_definition(mlp, terms):
    x = np.random.default_rng(1).normal(0, 1, (3, 6)).astype(F32)
    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(terms=terms, min_params=0),
                                             add_attention=None), input_shapes={"x": [3, 6]})
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    orig = {i.name: numpy_helper.to_array(i) for i in mlp.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    # After: the ShiftLinear definition, executed; its output is ORT's, bit for bit.
    after = {"fc1": Counter(), "fc2": Counter()}
    h = shift_linear_counted(x, nodes["fc1"], inits, after["fc1"])
    y = shift_linear_counted(np.maximum(h, 0), nodes["fc2"], inits, after["fc2"])
    np.testing.assert_array_equal(y, session(result.model.SerializeToString()).run(None, {"x": x})[0])
    # Before: the float MatMul (+ bias Add) executed.
    before = {"fc1": Counter(), "fc2": Counter()}
    h = matmul_counted(x, orig["w1"], before["fc1"], bias=orig["b1"])
    matmul_counted(np.maximum(h, 0), orig["w2"], before["fc2"])
    report = result.report.to_dict()
    layers = {c["node"]: c for p in report["passes"] for c in p["converted"]}
    for name in ("fc1", "fc2"):
        assert by_kind(layers[name]["cost"]["after"]) == dict(after[name])
        assert by_kind(layers[name]["cost"]["before"]) == dict(before[name])
    costs = report["costs"]
    assert by_kind(costs["after"]) == dict(after["fc1"] + after["fc2"])
    assert by_kind(costs["before"]) == dict(before["fc1"] + before["fc2"])
    total = sum(after["fc1"][k] * ENERGY_PJ[k] for k in after["fc1"]) + sum(
        after["fc2"][k] * ENERGY_PJ[k] for k in after["fc2"])
    assert costs["after"]["energy_pj"] == pytest.approx(total)
    assert after["fc1"]["int32_add"] < terms * 3 * 5 * 6   # zero codes are not counted
    # Existing keys stay; the new ones carry units.
    assert {"input_shapes", "file_bytes_before", "file_bytes_after", "passes", "warnings", "notes"} <= report.keys()
    assert {"macs_removed", "bytes_before", "bytes_after", "rows"} <= layers["fc1"].keys()
    assert costs["units"]["energy"] == "pJ per inference" and costs["energy_pj_per_op"]["fp32_mul"] == 3.7


def test_weight_sqnr_against_pow2_decoding(mlp):
    import torch

    from mfconvert.nn import pow2

    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(terms=2, min_params=0),
                                             add_attention=None))
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    w = numpy_helper.to_array(mlp.graph.initializer[0]).T.astype(np.float64)   # [out, in]
    codes = pow2.unpack_codes(inits["fc1.codes"], 2 * w.size, 5).reshape(2, *w.shape)
    value = pow2.decode_codes(torch.from_numpy(codes), torch.from_numpy(inits["fc1.exponent"].copy()), 5).double().numpy()
    expected = 10 * np.log10((w ** 2).sum() / ((w - value) ** 2).sum())
    (fc1,) = [c for c in result.report.changes if c.node == "fc1"]
    result.report.to_dict()
    assert fc1.weight_sqnr_db == pytest.approx(expected, abs=1e-9)


# --- AddLinearAttention: the kernel's additions depend on the code bits --------------------------
def attention_counted(q, k, v, heads, n: Counter):
    b, t, c = q.shape
    d = c // heads
    y = np.zeros_like(q)
    chunks = -(-t // 256)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qb, kb = q[bi, :, sl] > 0, k[bi, :, sl] > 0
            s = np.zeros((d, d), dtype=np.float64)
            for j in range(t):
                for r in np.flatnonzero(kb[j]):
                    s[r] += v[bi, j, sl]
                    n["fp32_add"] += d
            n["fp32_add"] += (chunks - 1) * d * d
            for ti in range(t):
                u = np.zeros(d)
                for r in np.flatnonzero(qb[ti]):
                    u += s[r]
                    n["fp32_add"] += d
                z = 0.5 * v[bi, ti, sl] + u / math.pi
                n["fp32_mul"] += 2 * d
                n["fp32_add"] += d
                norm = math.sqrt(float((z * z).sum()))
                n["fp32_mul"] += d
                n["fp32_add"] += d
                n["fp32_special"] += 1
                y[bi, ti, sl] = z / max(norm, 1e-12)
                n["fp32_mul"] += d
    return y


def test_attention_counts_at_half_the_bits_match_random_inputs():
    b, t, c, heads = 1, 300, 32, 2     # 300 tokens: two key chunks of the kernel
    names = ["q", "k", "v"]
    node = helper.make_node("AddLinearAttention", names, ["y"], name="att.add_attention", domain="ai.mfconvert",
                            num_heads=heads)
    graph = helper.make_graph([node], "att", [helper.make_tensor_value_info(s, TensorProto.FLOAT, [b, t, c])
                                              for s in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, t, c])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.mfconvert", 1)])
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(0, 1, (b, t, c)).astype(F32) for _ in range(3))
    counted = Counter()
    y = attention_counted(q, k, v, heads, counted)
    got = session(model.SerializeToString()).run(None, {"q": q, "k": k, "v": v})[0]
    np.testing.assert_allclose(y, got, atol=2e-5)   # the interpreter is the op (float sums reordered)
    after = model_costs(model, model, {}, [])["after"]["by_kind"]
    assert after["fp32_mul"] == counted["fp32_mul"] and after["fp32_special"] == counted["fp32_special"]
    # Random zero-mean inputs set each bit with probability 1/2: 9,600 bits, so the measured
    # additions lie within 3 % (≈ 5 standard deviations) of the count at half the bits.
    assert after["fp32_add"] == pytest.approx(counted["fp32_add"], rel=0.03)


def test_softmax_core_before():
    """The float attention core (MatMul, Softmax, MatMul) as the interpreter executes it."""
    t, d = 5, 3
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    graph = helper.make_graph(nodes, "core", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [t, d]),
                                              helper.make_tensor_value_info("kt", TensorProto.FLOAT, [d, t]),
                                              helper.make_tensor_value_info("v", TensorProto.FLOAT, [t, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(3)
    q, kt, v = rng.normal(size=(t, d)), rng.normal(size=(d, t)), rng.normal(size=(t, d))
    n = Counter()
    s = matmul_counted(q, kt, n)
    p = np.zeros_like(s)
    for r in range(t):
        e = np.exp(s[r] - s[r].max())
        n["fp32_add"] += t          # − max
        n["fp32_special"] += t      # exp
        n["fp32_add"] += t          # the sum
        p[r] = e / e.sum()
        n["fp32_mul"] += t          # ÷ the sum
    matmul_counted(p, v, n)
    assert by_kind(model_costs(model, model, {}, [])["before"]) == dict(n)


# --- ShiftConv and AdderConv, by the agreed spec ---------------------------------------------------
CONV = dict(kernel_shape=[3, 3], strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 2], group=2)


def conv_positions(x_shape, at):
    (kh, kw), (sh, sw), (ph, pw, _, _), (dh, dw) = at["kernel_shape"], at["strides"], at["pads"], at["dilations"]
    oh = (x_shape[2] + at["pads"][0] + at["pads"][2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x_shape[3] + at["pads"][1] + at["pads"][3] - dw * (kw - 1) - 1) // sw + 1
    for a in range(oh):
        for b in range(ow):
            yield (a, b), [(u, w, a * sh - ph + u * dh, b * sw - pw + w * dw) for u in range(kh) for w in range(kw)]


def conv_model(op, inputs, inits, m, extra):
    node = helper.make_node(op, [i for i, _ in inputs] + [i.name for i in inits], ["y"], name="conv",
                            domain="ai.mfconvert", **CONV, **extra)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info(i, TensorProto.FLOAT, s) for i, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.mfconvert", 1)])


def test_shift_conv_counts_equal_the_executed_spec():
    from mfconvert.nn import pow2

    x_shape, m, terms, bits = [2, 4, 5, 6], 6, 2, 5
    g = CONV["group"]
    cg = x_shape[1] // g
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 32, (terms, m, cg, 3, 3))
    codes[rng.random(codes.shape) < 0.3] = 15            # zero codes
    inits = [numpy_helper.from_array(pow2.pack_codes(codes, bits), "w"),
             numpy_helper.from_array(np.zeros(m, np.int8), "e"), numpy_helper.from_array(np.ones(m, F32), "b")]
    model = conv_model("ShiftConv", [("x", x_shape)], inits, m, dict(out_channels=m, terms=terms, weight_bits=bits))
    n = Counter()
    n["shift"] += math.prod(x_shape)                    # x_q per input element
    for _ in range(x_shape[0]):
        for o in range(m):
            grp = o // (m // g)
            for _, taps in conv_positions(x_shape, CONV):
                for t in range(terms):
                    for c in range(cg):
                        for u, w, ih, iw in taps:     # padded taps are x_q = 0, summed like the others
                            if codes[t, o, c, u, w] & 15 != 15:
                                n["shift"] += 1
                                n["int32_add"] += 1
                n["shift"] += 1                        # · 2^(e − F)
                n["fp32_add"] += 1                     # + b
    assert by_kind(model_costs(model, model, {}, [])["after"]) == dict(n)


def test_adder_conv_counts_equal_the_executed_spec():
    x_shape, m = [1, 4, 5, 6], 4
    cg = x_shape[1] // CONV["group"]
    w = numpy_helper.from_array(np.random.default_rng(5).normal(size=(m, cg, 3, 3)).astype(F32), "w")
    model = conv_model("AdderConv", [("x", x_shape)], [w], m, dict(out_channels=m))
    n = Counter()
    n["shift"] += math.prod(x_shape)
    for _ in range(x_shape[0]):
        for _ in range(m):
            for _, taps in conv_positions(x_shape, CONV):
                for _ in range(cg):
                    for _ in taps:
                        n["int32_add"] += 1           # x_q − w_q
                        n["int_abs"] += 1             # |·|
                        n["int64_add"] += 1           # into the int64 sum
                n["shift"] += 1                        # −acc · 2^−F
    assert by_kind(model_costs(model, model, {}, [])["after"]) == dict(n)


def test_float_conv_before():
    x_shape = [1, 4, 5, 6]
    w = numpy_helper.from_array(np.ones((6, 2, 3, 3), F32), "w")
    b = numpy_helper.from_array(np.ones(6, F32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **CONV)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    n = Counter()
    for _ in range(6):
        for _, taps in conv_positions(x_shape, CONV):
            for _ in range(2):
                for _ in taps:
                    n["fp32_mul"] += 1
                    n["fp32_add"] += 1
            n["fp32_add"] += 1
    assert by_kind(model_costs(model, model, {}, [])["before"]) == dict(n)


# --- ShiftMoEMLP at the measured split ---------------------------------------------------------------
def test_moe_counts_at_the_measured_routing_split():
    from mfconvert.moe import routing_split

    rng = np.random.default_rng(6)
    d, hidden, d_out, rows = 16, 32, 8, 40
    w1, b1, w2 = (rng.normal(0, .2, s).astype(F32) for s in ((d, hidden), (hidden,), (hidden, d_out)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d_out])],
                              [numpy_helper.from_array(a, s) for a, s in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_onnx(model, ConvertConfig(shift_linear=None, add_attention=None, moe_mlp=MoEMLPConfig()),
                          input_shapes={"x": [rows, d]})
    x = rng.normal(0, 1, (rows, d)).astype(F32)
    split = routing_split(result.model, {"x": x})["fc1"]
    assert 0 < split.shift < rows
    result.report.moe_shift_fraction = {"fc1": split.shift / rows}
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    n1, n2 = Counter(), Counter()
    xs, xm = x[:split.shift], x[split.shift:]          # which rows go where does not change the counts
    matmul_counted(x, inits["fc1/moe/router.weight"].T, n1, bias=inits["fc1/moe/router.bias"])
    n1["fp32_add"] += 4 * rows                         # 2-way softmax: − max, + sum
    n1["fp32_mul"] += 2 * rows                         # ÷ sum
    n1["fp32_special"] += 2 * rows                     # exp
    n1["fp32_mul"] += rows * d_out                     # gate · expert output
    h = matmul_counted(xm, inits["fc1/moe/mult.fc1.weight"].T, n1, bias=inits["fc1/moe/mult.fc1.bias"])
    matmul_counted(np.maximum(h, 0), inits["fc1/moe/mult.fc2.weight"].T, n2)
    h = shift_linear_counted(xs, nodes["fc1/moe/shift.fc1"], inits, n1)
    shift_linear_counted(np.maximum(h, 0), nodes["fc1/moe/shift.fc2"], inits, n2)
    layers = {c["node"]: c for p in result.report.to_dict()["passes"] for c in p["converted"]}
    assert by_kind(layers["fc1"]["cost"]["after"]) == dict(n1)
    assert by_kind(layers["fc2"]["cost"]["after"]) == dict(n2)


# --- the page and the CLI ------------------------------------------------------------------------------
class Checker(HTMLParser):
    """Collects start tags and checks every non-void element closes in order."""
    VOID = {"meta", "line", "circle", "br", "img", "input", "link", "hr", "path", "rect"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.errors = [], Counter(), []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] += 1

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_cli_report_html_and_json(mlp, tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp, path)
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "o.onnx"), "--min-params", "0",
                                   "--input-shape", "x=3,6", "--report-html", str(html), "--report-json", str(js)])
    assert res.exit_code == 0, res.output
    assert "energy estimate (45 nm" in res.output
    report = json.loads(js.read_text())
    page = html.read_text()
    assert page == render(report)
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack
    assert checker.tags["circle"] == 2 and checker.tags["svg"] == 1   # one point per layer with a SQNR
    assert "<script" not in page and page.count("http") == page.count('xmlns="http://www.w3.org/2000/svg"')
    # Never replaces an input.
    res = CliRunner().invoke(app, [str(path), "--dry-run", "--report-html", str(path), "--force"])
    assert res.exit_code == 1 and "--report-html" in res.output and "refusing to overwrite" in res.output


def test_report_html_page_parses(mlp):
    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None),
                          input_shapes={"x": [3, 6]})
    page = render(result.report.to_dict())
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack
    assert checker.tags["circle"] == 2 and checker.tags["svg"] == 1   # one point per layer with a SQNR
    assert "<script" not in page and page.count("http") == page.count('xmlns="http://www.w3.org/2000/svg"')
    assert "fc1" in page and "energy per inference" in page


def test_table_shows_the_costliest_layers_of_a_large_model():
    rng = np.random.default_rng(7)
    nodes, inits, x, width = [], [], "x", 8
    for i in range(14):
        size = 8 + 4 * i    # later layers are larger: the costliest
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        inits.append(numpy_helper.from_array(rng.normal(size=(width, size)).astype(F32), f"w{i}"))
        x, width = f"h{i}", size
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_onnx(model, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None))
    table = result.report.table()
    shown = [line.split()[0] for line in table.splitlines()[2:12]]
    assert shown == [f"fc{i}" for i in range(13, 3, -1)]
    assert "… 4 more layer(s), the 10 costliest after conversion shown" in table


def test_conv_layers_through_the_passes():
    """Conv + BatchNormalization → ShiftConv (BN folded) and Conv → AdderConv + BN: each layer's
    before is the float Conv and BN executed, its after the new nodes' counts."""
    from mfconvert.passes.adder_conv import AdderConvConfig
    from mfconvert.passes.conv import ShiftConvConfig

    rng = np.random.default_rng(8)
    x_shape = [1, 4, 5, 6]
    w = rng.normal(size=(6, 2, 3, 3)).astype(F32)
    bn = [numpy_helper.from_array(v.astype(F32), f"bn.{k}") for k, v in
          (("s", rng.uniform(.5, 1.5, 6)), ("b", rng.normal(size=6)), ("m", rng.normal(size=6)), ("v", rng.uniform(.5, 2, 6)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **CONV),
             helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 3, 4])],
                              [numpy_helper.from_array(w, "w"), *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = Counter()
    for _ in range(6):
        for _, taps in conv_positions(x_shape, CONV):
            for _ in range(2 * len(taps)):
                before["fp32_mul"] += 1
                before["fp32_add"] += 1
            before["fp32_mul"] += 1   # BN: scale
            before["fp32_add"] += 1   # BN: shift
    for cfg in (ConvertConfig(shift_linear=None, add_attention=None, shift_conv=ShiftConvConfig()),
                ConvertConfig(shift_linear=None, add_attention=None, adder_conv=AdderConvConfig(first=True))):
        result = convert_onnx(model, cfg)
        (layer,) = result.report.changes
        result.report.to_dict()
        assert by_kind(layer.cost["before"]) == dict(before)
        ours = [n for n in result.model.graph.node if n.domain == "ai.mfconvert"]
        assert len(ours) == 1
        one = onnx.ModelProto()
        one.CopyFrom(result.model)
        expected = model_costs(one, one, {}, [])["after"]   # every counted node of the converted graph
        assert layer.cost["after"] == expected
        if layer.new_op == "AdderConv":   # another function, not a rounding of the conv's weights
            assert layer.weight_sqnr_db is None
            continue
        import torch

        from mfconvert.nn import pow2
        inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
        s, b, mu, var = (numpy_helper.to_array(t).astype(np.float64) for t in bn)
        folded = (w.astype(np.float64) * (s / np.sqrt(var + 1e-5))[:, None, None, None]).reshape(6, -1)
        codes = pow2.unpack_codes(inits[ours[0].input[1]], folded.size, 5).reshape(1, *folded.shape)
        value = pow2.decode_codes(torch.from_numpy(codes), torch.from_numpy(inits[ours[0].input[2]].copy()), 5)
        expected = 10 * np.log10((folded ** 2).sum() / ((folded - value.double().numpy()) ** 2).sum())
        assert layer.weight_sqnr_db == pytest.approx(expected, abs=1e-3)   # BN folded in float32 by the pass


def test_counts_follow_a_replaced_model(mlp):
    """A step that replaces the result's model (compensated rounding rewrites the codes) is
    counted: here every code of fc1 becomes the zero code."""
    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None),
                          input_shapes={"x": [3, 6]})
    assert result.report.costs["after"]["by_kind"]["int32_add"] > 0
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(result.model)
    for init in rewritten.graph.initializer:
        if init.name == "fc1.codes":   # 5-bit codes 0b01111 (zero code) packed: all bits of 30 codes
            init.CopyFrom(numpy_helper.from_array(np.packbits(np.tile([1, 1, 1, 1, 0], 30).astype(np.uint8),
                                                              bitorder="little"), "fc1.codes"))
    result.model = rewritten
    layers = {c.node: c for c in result.report.changes}
    assert result.report.costs["after"]["by_kind"]["int32_add"] == layers["fc2"].cost["after"]["by_kind"]["int32_add"]
    assert layers["fc1"].cost["after"]["by_kind"]["int32_add"] == 0


@pytest.mark.usefixtures("one_torch_thread")
def test_layers_and_totals_agree_on_an_exported_vit(tmp_path):
    """On a torch.onnx export of a ViT (shift linears and add attention): what the layers'
    'before' removes from the original graph's counted nodes is what is left once their 'after'
    is taken from the converted graph's — the softmax core's before (two MatMuls and the Softmax,
    written per layer as a formula) against the exported nodes counted one by one."""
    import torch

    from mfconvert.tests.attention_models import TinyViT, export

    torch.manual_seed(0)
    path = export(TinyViT().eval(), (torch.randn(2, 3, 32, 32),), tmp_path / "vit.onnx", dynamo=False, opset=17,
                  input_names=["img"])
    result = convert_onnx(str(path), ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), shift_conv=None))
    report = result.report.to_dict()
    layers = [c for p in report["passes"] for c in p["converted"]]
    assert {c["pass_name"] for c in layers} == {"shift-linear", "add-attention"}
    costs = report["costs"]
    assert not costs["notes"]
    for kind in costs["before"]["by_kind"]:
        left_before = costs["before"]["by_kind"][kind] - sum(c["cost"]["before"]["by_kind"][kind] for c in layers)
        left_after = costs["after"]["by_kind"][kind] - sum(c["cost"]["after"]["by_kind"][kind] for c in layers)
        assert left_before == left_after, kind
    assert costs["after"]["multiplications"] < costs["before"]["multiplications"] / 5   # the patch conv stays float
    for side in ("before", "after"):   # the totals by op type add up to the totals
        for kind, total in costs[side]["by_kind"].items():
            assert sum(f["by_kind"][kind] for f in costs["by_op"][side].values()) == total
    assert set(costs["by_op"]["after"]) == {"Conv", "ShiftLinear", "AddLinearAttention"}   # the float ops left: Conv
    assert "Softmax" in costs["by_op"]["before"] and "Softmax" not in costs["by_op"]["after"]


def test_measured_output_errors_are_drawn(mlp):
    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None),
                          input_shapes={"x": [3, 6]})
    result.report.set_output_errors({"fc1": 0.02, "fc2": 0.001, "elsewhere": 1.0})
    report = result.report.to_dict()
    assert [c["output_error"] for c in report["passes"][0]["converted"]] == [0.02, 0.001]
    checker = Checker()
    checker.feed(render(report))
    assert checker.tags["svg"] == 2 and checker.tags["circle"] == 4   # SQNR and measured error, 2 layers each


def test_page_takes_the_allocations_sqnr_where_the_report_has_none(mlp):
    result = convert_onnx(mlp, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), add_attention=None),
                          input_shapes={"x": [3, 6]})
    report = result.report.to_dict()
    report["passes"][0]["converted"][0]["weight_sqnr_db"] = None   # e.g. a dequantised QDQ weight
    report["allocation"] = {"nodes": [{"node": "fc1", "terms": 2, "weight_sqnr_db": [13.9, 28.1, 42.6, 56.0]}]}
    page = render(report)
    assert "28.1" in page and "2 term(s); 1–4 terms: 14 / 28 / 43 / 56 dB" in page
    assert page.count("<circle") == 2 and report["passes"][0]["converted"][0]["weight_sqnr_db"] is None
