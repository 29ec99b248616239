"""Fuzzing the `mfconvert` command (issue 10, "Keep it fixed"): small valid models (an MLP, a
Gemm, a ViT block with attention), mutated field by field (dims, data types, raw data, attributes,
node inputs, names, cycles, opsets, external data, unusual linears) and converted with random
flags. Every run must end with exit 0, or exit 1 and one `mfconvert: error: ` line on stderr, leave
the input's files byte for byte as they were and no temporary file beside the output; a model
written passes onnx's checker and loads in ONNX Runtime whenever the input does.

MFCONVERT_FUZZ_EXAMPLES sets the examples per test (default: a slice that takes ~20 s); a set
value also makes the run random instead of the same fixed examples each time. With
MFCONVERT_FUZZ_STATS=FILE the cases and exit statuses per test are appended to FILE as JSON lines."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.cli.main import app
from mfconvert.convert.onnx_model import output_path_for
from mfconvert.runtime import session
from tests.fuzz_stats import stats_fixture

EXAMPLES = int(os.environ.get("MFCONVERT_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 100, deadline=None, database=None, derandomize=EXAMPLES is None,
                suppress_health_check=list(HealthCheck), print_blob=True)
ERROR = re.compile(r"mfconvert: error: \S.*")
runner = CliRunner()
pytestmark = pytest.mark.fuzz
STATS: dict[str, Counter] = {}

write_stats = stats_fixture(STATS)


# --- Seed models -------------------------------------------------------------------------------

def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.normal(0, .1, (64, 96)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .1, 96).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, .1, (96, 32)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm", transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Tanh", ["h"], ["y"], name="tanh")]
    inits = [numpy_helper.from_array(rng.normal(0, .1, (48, 80)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, .1, 48).astype(np.float32), "c")]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _vit_block() -> onnx.ModelProto:
    """A timm ViT block (attention + MLP), dim 32, 2 heads, exported by torch's TorchScript exporter."""
    import torch

    from mfconvert.tests.attention_models import Block, export
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(Block(32, 2), (torch.randn(1, 5, 32),), os.path.join(tmp, "block.onnx"), dynamo=False,
                      opset=17, input_names=["x"], dynamic_axes={"x": {0: "b", 1: "t"}})
        return onnx.load(path)


SEEDS = {"mlp": _mlp, "gemm": _gemm, "vit_block": _vit_block}
_cache: dict[str, bytes] = {}


def seed_model(name: str) -> onnx.ModelProto:
    if name not in _cache:
        _cache[name] = SEEDS[name]().SerializeToString()
    return onnx.ModelProto.FromString(_cache[name])


# --- Mutations: each takes the model and a draw function, changes one thing ----------------------

def _pick(draw, items, label):
    items = list(items)
    return items[draw(st.integers(0, len(items) - 1), label=label)] if items else None


INTS = st.one_of(st.integers(-3, 70), st.sampled_from([0, -1, 2 ** 31, 2 ** 62 + 1, -(2 ** 63), 2 ** 63 - 1]))


def m_dims(model, draw):
    t = _pick(draw, model.graph.initializer, "initializer")
    if t is not None:
        dims = draw(st.lists(INTS, max_size=4), label="dims")
        del t.dims[:]
        t.dims.extend(dims)


def m_data_type(model, draw):
    t = _pick(draw, model.graph.initializer, "initializer")
    if t is not None:
        t.data_type = draw(st.integers(0, 27), label="data_type")


def m_raw_data(model, draw):
    t = _pick(draw, [t for t in model.graph.initializer if t.HasField("raw_data")], "initializer")
    if t is not None:
        raw = t.raw_data
        keep = draw(st.integers(0, len(raw) + 16), label="bytes")
        t.raw_data = raw[:keep] + b"\x7f" * max(0, keep - len(raw))


def m_values(model, draw):
    """NaN, Inf, huge or tiny weights."""
    t = _pick(draw, [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
                     and t.data_location != TensorProto.EXTERNAL], "initializer")
    try:
        a = numpy_helper.to_array(t).copy()
    except Exception:   # none, or already mutated past reading
        return
    if a.size:
        a.reshape(-1)[draw(st.integers(0, max(a.size - 1, 0)))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 0.0]), label="value")
        if draw(st.booleans(), label="whole tensor"):
            a[...] = a.reshape(-1)[0] if a.size else 0
        t.CopyFrom(numpy_helper.from_array(a, t.name))


def m_attribute(model, draw):
    nodes = [n for n in model.graph.node if n.attribute] or list(model.graph.node)
    node = _pick(draw, nodes, "node")
    if node is None:
        return
    if node.attribute and draw(st.booleans(), label="change existing"):
        attr = _pick(draw, node.attribute, "attribute")
        name = attr.name
        node.attribute.remove(attr)
    else:
        name = draw(st.sampled_from(["transA", "transB", "alpha", "axis", "perm", "to", "value", "bogus"]))
    kind = draw(st.sampled_from(["int", "float", "ints", "string", "tensor", "graph"]), label="kind")
    value = {"int": lambda: draw(INTS), "float": lambda: draw(st.floats(allow_nan=True)),
             "ints": lambda: draw(st.lists(INTS, max_size=4)), "string": lambda: draw(st.text(max_size=5)).encode(),
             "tensor": lambda: numpy_helper.from_array(np.ones(draw(st.integers(0, 3)), np.float32)),
             "graph": lambda: helper.make_graph([], "g", [], [])}[kind]()
    if kind == "ints" and not value:
        attr = AttributeProto(name=name, type=AttributeProto.INTS)
    else:
        attr = helper.make_attribute(name, value)
    node.attribute.append(attr)


def m_inputs(model, draw):
    node = _pick(draw, model.graph.node, "node")
    if node is None:
        return
    how = draw(st.sampled_from(["rename", "remove", "add", "empty", "output"]), label="how")
    names = [v for n in model.graph.node for v in n.output] + [i.name for i in model.graph.initializer] + ["nowhere"]
    if how == "rename" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = _pick(draw, names, "name")
    elif how == "remove" and node.input:
        del node.input[draw(st.integers(0, len(node.input) - 1))]
    elif how == "add":
        node.input.append(_pick(draw, names, "name"))
    elif how == "empty" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = ""
    elif how == "output" and node.output:
        node.output[0] = _pick(draw, names, "name")


def m_cycle(model, draw):
    """Feed the last node's output back into an earlier node."""
    if len(model.graph.node) > 1 and model.graph.node[-1].output:
        first = model.graph.node[draw(st.integers(0, len(model.graph.node) - 2))]
        first.input.append(model.graph.node[-1].output[0])


def m_duplicate(model, draw):
    what = draw(st.sampled_from(["node", "node name", "initializer", "input"]), label="duplicate")
    if what == "node":
        model.graph.node.append(_pick(draw, model.graph.node, "node"))
    elif what == "node name" and len(model.graph.node) > 1:
        model.graph.node[1].name = model.graph.node[0].name
    elif what == "initializer" and model.graph.initializer:
        model.graph.initializer.append(_pick(draw, model.graph.initializer, "initializer"))
    elif what == "input" and model.graph.input:
        model.graph.input.append(model.graph.input[0])


def m_opset(model, draw):
    how = draw(st.sampled_from(["version", "domain", "ir", "remove"]), label="how")
    if how == "version" and model.opset_import:
        model.opset_import[0].version = draw(st.integers(-1, 30))
    elif how == "domain":
        model.opset_import.append(helper.make_opsetid(draw(st.sampled_from(["ai.mfconvert", "x", ""])),
                                                      draw(st.integers(-1, 30))))
    elif how == "ir":
        model.ir_version = draw(st.integers(-1, 13))
    elif how == "remove":
        del model.opset_import[:]


def m_op_type(model, draw):
    node = _pick(draw, model.graph.node, "node")
    if node is not None:
        node.op_type = draw(st.sampled_from(["MatMul", "Gemm", "Add", "Softmax", "Relu", "Conv", "Nope",
                                             "ShiftLinear", "AddLinearAttention"]))
        if node.op_type in ("ShiftLinear", "AddLinearAttention") and draw(st.booleans()):
            node.domain = "ai.mfconvert"


def m_io_type(model, draw):
    value = _pick(draw, list(model.graph.input) + list(model.graph.output), "value")
    if value is None:
        return
    how = draw(st.sampled_from(["elem", "dims", "clear"]), label="how")
    tt = value.type.tensor_type
    if how == "elem":
        tt.elem_type = draw(st.integers(0, 27))
    elif how == "dims":
        tt.shape.Clear()
        for d in draw(st.lists(st.one_of(INTS, st.sampled_from(["n", ""])), max_size=4)):
            dim = tt.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    else:
        value.type.Clear()


def m_remove(model, draw):
    what = draw(st.sampled_from(["initializer", "node", "output", "input"]), label="remove")
    seq = {"initializer": model.graph.initializer, "node": model.graph.node, "output": model.graph.output,
           "input": model.graph.input}[what]
    if len(seq):
        del seq[draw(st.integers(0, len(seq) - 1))]


def m_external(model, draw):
    """Move an initializer to external data, with a sane or a broken reference."""
    t = _pick(draw, [t for t in model.graph.initializer if t.HasField("raw_data")], "initializer")
    if t is None:
        return
    raw = t.raw_data
    broken = draw(st.sampled_from(["none", "location", "offset", "length", "missing", "absolute"]), label="broken")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    location = {"location": "../outside.bin", "missing": "missing.bin", "absolute": "/etc/passwd"}.get(broken, "w.bin")
    offset = {"offset": 1 << 40}.get(broken, 0)
    length = {"length": len(raw) + 4}.get(broken, len(raw))
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    model.metadata_props.add(key="fuzz.external", value=raw.hex())


def _readable(t: TensorProto) -> bool:
    try:
        numpy_helper.to_array(t)
        return True
    except Exception:   # an earlier mutation broke it
        return False


def m_structure(model, draw):
    """Still valid (mostly) but unusual graphs around the linears the passes rewrite."""
    linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    node = _pick(draw, linears, "linear")
    if node is None or not node.output:
        return
    inits = {t.name: t for t in model.graph.initializer}
    how = draw(st.sampled_from(["output too", "second consumer", "shared weight", "constant node", "gemm attrs",
                                "weight dtype", "bias shape", "bias first", "weight reshape", "3-d weight"]),
               label="how")
    y = node.output[0]
    if how == "output too":
        model.graph.output.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    elif how == "second consumer":
        model.graph.node.append(helper.make_node("Identity", [y], ["y_copy"], name="copy"))
        model.graph.output.append(helper.make_tensor_value_info("y_copy", TensorProto.FLOAT, None))
    elif how == "shared weight" and len(node.input) > 1:
        model.graph.node.append(helper.make_node(node.op_type, [node.input[0], node.input[1]], ["y_twin"],
                                                 name="twin", **{a.name: helper.get_attribute_value(a)
                                                                 for a in node.attribute}))
        model.graph.output.append(helper.make_tensor_value_info("y_twin", TensorProto.FLOAT, None))
    elif how == "constant node" and len(node.input) > 1 and node.input[1] in inits:
        t = inits[node.input[1]]
        model.graph.initializer.remove(t)
        model.graph.node.insert(0, helper.make_node("Constant", [], [t.name], name="w_const", value=t))
    elif how == "gemm attrs" and node.op_type == "Gemm":
        for a in list(node.attribute):
            node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute(k, draw(v)) for k, v in
                               (("transA", st.integers(0, 1)), ("transB", st.integers(0, 1)),
                                ("alpha", st.sampled_from([0.0, 1.0, -2.0, 1e30])),
                                ("beta", st.sampled_from([0.0, 1.0, 3.0])))])
    elif how == "weight dtype" and len(node.input) > 1 and node.input[1] in inits:
        t = inits[node.input[1]]
        if not _readable(t):
            return
        dtype = draw(st.sampled_from([np.float16, np.float64, np.int32, np.int8, np.bool_]), label="dtype")
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    elif how in ("bias shape", "bias first"):
        add = next((n for n in model.graph.node if n.op_type == "Add" and y in n.input), None)
        bias = add and next((inits[i] for i in add.input if i in inits), None)
        if bias is None or not _readable(bias):
            return
        if how == "bias first":
            add.input[:] = list(reversed(add.input))
        else:
            b = numpy_helper.to_array(bias)
            shape = draw(st.sampled_from([(1, b.size), (b.size, 1), (1, 1, b.size), (1,), ()]), label="shape")
            b = b.reshape(-1)[:int(np.prod(shape))].reshape(shape) if np.prod(shape) <= b.size else b
            bias.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(b), bias.name))
    elif how in ("weight reshape", "3-d weight") and len(node.input) > 1 and node.input[1] in inits:
        t = inits[node.input[1]]
        if not _readable(t):
            return
        w = numpy_helper.to_array(t)
        w = w.reshape(1, *w.shape) if how == "3-d weight" else w.reshape(w.shape[::-1])
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), t.name))


MUTATIONS = [m_structure, m_structure, m_dims, m_data_type, m_raw_data, m_values, m_attribute, m_inputs, m_cycle, m_duplicate, m_opset,
             m_op_type, m_io_type, m_remove, m_external]


# --- Flags -------------------------------------------------------------------------------------

def one_in(draw, n: int, label: str) -> bool:
    """True about once in n draws (hypothesis favours small integers and first elements, so
    `integers(0, n - 1) == 0` would come up far more often than 1/n)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]), label=label)


def draw_flags(draw, model: onnx.ModelProto, out_dir: str) -> list[str]:
    flags = []
    for flag in ("--no-shift-linear", "--no-add-attention", "--moe-mlp", "--dry-run", "--force"):
        if one_in(draw, 5, flag):
            flags.append(flag)
    options = {   # flag: (usual values, wrong ones: drawn one time in ten)
        "--weight-bits": ([2, 3, 4, 5], [0, 1, 6]), "--shift-terms": ([1, 2, 4], [0, 5, -1]),
        "--weight-scale": (["channel", "tensor", "none"], ["bogus"]),
        "--act-bits": ([8, 16, 32], [0, 33]), "--act-frac-bits": ([0, 8, 16, 24, 31, -4], [-40, 40]),
        "--min-params": (["0", "1", "1024", "100000"], ["-5", "x"]),
        "--act-percentile": (["99.9"], ["-1", "nan"]),
        "--include": (["fc1", "gemm", ".*", "attn", "Mat"], ["[", "(?"]),
        "--exclude": (["fc2", "mlp", "^$", "gemm"], ["(", "*"]),
        "--rounding": (["nearest", "compensated"], ["odd"]),
        "--finetune-loss": (["mse", "kl", "cosine"], ["bad"]),
    }
    for flag, (good, bad) in options.items():
        if one_in(draw, 4, flag):
            wrong = one_in(draw, 12, f"{flag} wrong")
            flags += [flag, str(draw(st.sampled_from(bad if wrong else good)))]
    if one_in(draw, 5, "--input-shape"):
        names = [i.name for i in model.graph.input] + ["nope"]
        dims = draw(st.lists(st.sampled_from(["1", "0", "64", "-1", "x", "99999999999999999999", "2", "5", "32"]),
                             max_size=4))
        flags += ["--input-shape", f"{_pick(draw, names, 'input')}={','.join(dims)}"]
    for flag, name in (("--report-json", "report.json"), ("--save-config", "config.json")):
        if one_in(draw, 4, flag):
            where = draw(st.sampled_from([out_dir] * 8 + [os.path.join(out_dir, "missing"), out_dir + "/model.mf.onnx"]))
            flags += [flag, where if where.endswith(".onnx") else os.path.join(where, name)]
    if one_in(draw, 8, "--config"):
        path = os.path.join(out_dir, "in_config.json")
        with open(path, "w") as f:
            f.write(draw(st.sampled_from(['{"shift_linear": {"weight_bits": 4}}', '{"shift_linear": {"include": "fc1"}}',
                                          '{"shift_linear": null, "add_attention": {}}', '[]', '{', '{"bogus": 1}',
                                          '{"shift_linear": {"weight_bits": "4"}}'])))
        flags += ["--config", path]
    return flags


# --- Running and checking ----------------------------------------------------------------------

def digest(paths) -> dict[str, str]:
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths if os.path.isfile(p)}


def prepare(data, tmp: str) -> tuple[str, list[str], list[str]]:
    """Draw a seed model, mutations and flags; write the model. (model path, argv, input files)."""
    draw = data.draw
    model = seed_model(draw(st.sampled_from(sorted(SEEDS)), label="seed"))
    for _ in range(draw(st.sampled_from([0, 1, 0, 1, 2, 3]), label="mutations")):
        draw(st.sampled_from(MUTATIONS), label="mutation")(model, draw)
    in_dir, out_dir = os.path.join(tmp, "in"), os.path.join(tmp, "out")
    os.makedirs(in_dir)
    os.makedirs(out_dir)
    inputs = []
    for prop in [p for p in model.metadata_props if p.key == "fuzz.external"]:   # m_external's bytes
        with open(os.path.join(in_dir, "w.bin"), "ab") as f:
            f.write(bytes.fromhex(prop.value))
        inputs.append(os.path.join(in_dir, "w.bin"))
    path = os.path.join(in_dir, "model.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    inputs.append(path)
    output = draw(st.sampled_from([os.path.join(out_dir, "model.mf.onnx")] * 6 + [path, out_dir, None, None]), label="-o")
    argv = [path] + (["-o", output] if output else []) + draw_flags(draw, model, out_dir)
    return path, argv, inputs


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Hung in the run after `seconds` (SIGALRM): a conversion that never ends is a failure."""
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_run(code: int, stderr: str, exception, in_dir: str, out_dir: str, before: dict) -> None:
    counts = STATS.setdefault(sys._getframe(1).f_code.co_name, Counter())
    counts["cases"] += 1
    counts[f"exit {code}"] += 1
    assert exception is None or isinstance(exception, SystemExit), f"uncaught {exception!r}"
    assert code in (0, 1), f"exit {code}"
    assert "Traceback" not in stderr, stderr
    if code == 1:
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and ERROR.fullmatch(lines[0]), f"not one error line: {stderr!r}"
    assert digest(before) == before, "an input file changed"
    for d in (in_dir, out_dir):
        left = [f for f in os.listdir(d) if f.startswith(".mfconvert-") or f.endswith(".tmp")]
        assert not left, f"temporary files left in {d}: {left}"


def check_output(code: int, argv: list[str], path: str) -> None:
    """A model written with exit 0 passes onnx's checker, and loads in ONNX Runtime (with our ops)
    when the input does."""
    if code != 0 or "--dry-run" in argv:
        return
    written = argv[argv.index("-o") + 1] if "-o" in argv else output_path_for(path)
    assert os.path.isfile(written), "exit 0 without the output"
    onnx.checker.check_model(written)
    try:
        session(path, threads=1)
    except Exception:
        return   # ONNX Runtime refuses the input too
    session(written, threads=1)


@FUZZ
@given(st.data())
def test_mutated_models_through_the_cli(data):
    with tempfile.TemporaryDirectory() as tmp:
        path, argv, inputs = prepare(data, tmp)
        before = digest(inputs)
        out_dir = os.path.join(tmp, "out")
        with warnings.catch_warnings(), time_limit(120):
            warnings.simplefilter("always")   # printed every time, as in a fresh process
            result = runner.invoke(app, argv)
        note(f"argv {argv}\nexit {result.exit_code}\nstderr {result.stderr}")
        event(f"exit {result.exit_code}")
        event(re.sub(r"(/\S*|\d+)", "#", result.stderr.strip()[18:])[:48] or "no error")
        check_run(result.exit_code, result.stderr, result.exception, os.path.dirname(path), out_dir, before)
        check_output(result.exit_code, argv, path)


@settings(FUZZ, max_examples=max(2, (EXAMPLES or 100) // 50))
@given(st.data())
def test_mutated_models_through_the_real_command(data):
    """A few runs as a user runs it: a new process, real stderr, real exit status (a crash in native
    code shows here as a signal)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, argv, inputs = prepare(data, tmp)
        before = digest(inputs)
        run = subprocess.run([sys.executable, "-m", "mfconvert.cli.main", *argv], capture_output=True, text=True,
                             timeout=300, cwd=tmp)
        note(f"argv {argv}\nexit {run.returncode}\nstderr {run.stderr}")
        check_run(run.returncode, run.stderr, None, os.path.dirname(path), os.path.join(tmp, "out"), before)
        check_output(run.returncode, argv, path)


# --- What the harness found, kept as plain regression tests -------------------------------------

def _uint4_weight(nbytes: int) -> onnx.ModelProto:
    model = seed_model("mlp")
    w = model.graph.initializer[0]
    w.data_type, w.raw_data = TensorProto.UINT4, bytes(nbytes)
    return model


def _no_outputs() -> onnx.ModelProto:
    model = seed_model("mlp")
    del model.graph.output[:]
    return model


def _untyped_input() -> onnx.ModelProto:
    model = seed_model("mlp")
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return model


def test_found_by_fuzzing_untyped_input(tmp_path):
    """An input of type UNDEFINED crashed the shift-linear pass (KeyError) and then hung ORT's
    symbolic shape inference (it reran forever); now it converts, the counts left open."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_untyped_input().SerializeToString())
    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "o.onnx"), "--shift-terms", "4", "--min-params", "0"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "did not settle" in result.stdout and os.path.isfile(tmp_path / "o.onnx")


@pytest.mark.parametrize("argv,model,error", [
    (["--min-params", "x"], None, "Invalid value for '--min-params'"),         # was exit 2, a framed message
    (["--bogus"], None, "No such option: --bogus"),
    ([], _uint4_weight(24576), "initializer 'w1' with dims [64, 96]: needs 3072 bytes of raw data, has 24576"),
    ([], _uint4_weight(3072), "2/4-bit initializers such as 'w1' are not supported"),   # was a traceback
    ([], _no_outputs(), "invalid ONNX model (the graph has no outputs)"),   # was a model ORT cannot load
])
def test_found_by_fuzzing(tmp_path, argv, model, error):
    path = tmp_path / "m.onnx"
    path.write_bytes((model or seed_model("mlp")).SerializeToString())
    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "o.onnx"), *argv])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert ERROR.fullmatch(result.stderr.strip()) and error in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def campaign(examples: int, report: str) -> Counter:
    """A long run that records every failing case (argv, message, model) in the JSON file `report`
    instead of stopping at the first and shrinking it: `python -m tests.test_fuzz_cli N FILE`."""
    from hypothesis import Phase
    import traceback
    counts, failures = Counter(), []

    @settings(FUZZ, max_examples=examples, derandomize=False, phases=[Phase.generate])
    @given(st.data())
    def run(data):
        with tempfile.TemporaryDirectory() as tmp:
            path, argv, inputs = prepare(data, tmp)
            before = digest(inputs)
            with warnings.catch_warnings(), time_limit(120):
                warnings.simplefilter("always")
                result = runner.invoke(app, argv)
            counts[f"exit {result.exit_code}"] += 1
            try:
                check_run(result.exit_code, result.stderr, result.exception, os.path.dirname(path),
                          os.path.join(tmp, "out"), before)
                check_output(result.exit_code, argv, path)
            except Exception as err:
                failures.append({"argv": argv, "error": f"{type(err).__name__}: {err}"[:500],
                                 "stderr": result.stderr[-800:], "model": open(path, "rb").read().hex(),
                                 "traceback": "".join(traceback.format_exception(result.exception))[-2500:]
                                 if result.exception and not isinstance(result.exception, SystemExit) else ""})
    run()
    counts["cases"], counts["failures"] = sum(counts.values()), len(failures)
    with open(report, "w") as f:
        json.dump({"counts": counts, "failures": failures}, f, indent=1)
    return counts


if __name__ == "__main__":
    print(dict(campaign(int(sys.argv[1]), sys.argv[2])))
