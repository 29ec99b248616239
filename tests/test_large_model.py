"""Models with external data, and one over 2 GiB (issue 10, finding 6): read and written through
onnx's external-data format, converted end to end with bounded memory, the input's files untouched."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.cli.main import app
from mfconvert.passes import linear
from mfconvert.passes.linear import shift_linear_node
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.runtime import session

runner = CliRunner()


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mlp(rng) -> onnx.ModelProto:
    """x [n, 256] → MatMul 256×512 → Relu → MatMul 512×64 (+ bias Add): 0.6 MB of weights."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b2"], ["y"], name="fc2_bias")]
    inits = [numpy_helper.from_array(rng.normal(0, .05, (256, 512)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .05, (512, 64)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, .1, 64).astype(np.float32), "b2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_tensors(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL}


@pytest.mark.parametrize("scale,terms,bits,shape", [("channel", 1, 5, (40, 300)), ("tensor", 1, 5, (40, 300)),
                                                   ("none", 1, 3, (41, 301)), ("channel", 2, 3, (40, 300)),
                                                   ("channel", 2, 3, (41, 301))])
def test_rounding_in_chunks_gives_the_same_bytes(monkeypatch, scale, terms, bits, shape):
    """A weight rounded a few rows at a time packs to exactly the bytes of rounding it whole."""
    rng = np.random.default_rng(1)
    w = (rng.normal(0, 1, shape) * np.exp2(rng.integers(-6, 6, (shape[0], 1)))).astype(np.float32)
    cfg = ShiftLinearConfig(weight_bits=bits, terms=terms, weight_scale=scale)
    x, y = gs.Variable("x"), gs.Variable("y")
    whole, _ = shift_linear_node("fc", x, y, w, None, cfg)
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 1000)
    rows = linear.chunk_rows(*shape, bits, terms)
    assert rows == (shape[0] if terms > 1 and shape[0] * shape[1] * bits % 8 else 8)
    chunked, _ = shift_linear_node("fc", gs.Variable("x"), gs.Variable("y"), w, None, cfg)
    strided, _ = shift_linear_node("fc", gs.Variable("x"), gs.Variable("y"), np.asfortranarray(w), None, cfg)
    for a, b, c in zip(whole.inputs[1:], chunked.inputs[1:], strided.inputs[1:]):   # a MatMul's weight.T view
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.values, c.values)


def test_external_data_round_trip(tmp_path):
    """A model saved with external data converts to the same codes as the inline model, is written
    with its own external data (a relative location beside the output), runs in ONNX Runtime, and
    the input model and its data file stay byte for byte as they were."""
    rng = np.random.default_rng(0)
    model = mlp(rng)
    inline = tmp_path / "inline.onnx"
    onnx.save(model, inline)
    src = tmp_path / "in"
    src.mkdir()
    path = src / "mlp.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=1024)
    assert set(external_tensors(onnx.load(path, load_external_data=False))) == {"w1", "w2"}
    before = {p: sha256(p) for p in (path, src / "weights.bin")}

    dst = tmp_path / "out"
    dst.mkdir()
    out = dst / "mlp.mf.onnx"
    res = runner.invoke(app, [str(path), "-o", str(out), "--min-params", "1000"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out} (+ {out}.data)" in res.output
    assert {p: sha256(p) for p in before} == before
    assert sorted(os.listdir(dst)) == ["mlp.mf.onnx", "mlp.mf.onnx.data"]   # no temporary files left
    written = onnx.load(out, load_external_data=False)
    refs = external_tensors(written)
    assert {r["location"] for r in refs.values()} == {"mlp.mf.onnx.data"} and len(refs) == 2   # codes of fc1, fc2
    assert all(int(r["offset"]) % 4096 == 0 for r in refs.values())
    onnx.checker.check_model(str(out))

    plain = tmp_path / "plain.mf.onnx"
    assert runner.invoke(app, [str(inline), "-o", str(plain), "--min-params", "1000"]).exit_code == 0
    assert not os.path.exists(f"{plain}.data")
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(plain).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    x = rng.normal(0, 1, (3, 256)).astype(np.float32)
    ours = session(str(out), threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, session(str(plain), threads=1).run(None, {"x": x})[0])

    # Converting again over the output (with --force) replaces both files, never the input's.
    res = runner.invoke(app, [str(path), "-o", str(out), "--force", "--min-params", "1000"])
    assert res.exit_code == 0, res.output
    assert {p: sha256(p) for p in before} == before and sorted(os.listdir(dst)) == sorted(["mlp.mf.onnx", "mlp.mf.onnx.data"])


def test_refuses_to_write_the_inputs_external_data(tmp_path):
    """The output's .data file would be the input's own data file: refused before any work."""
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(np.random.default_rng(0)), path, save_as_external_data=True, location="m.mf.onnx.data")
    data = tmp_path / "m.mf.onnx.data"
    before = sha256(data)
    res = runner.invoke(app, [str(path), "--force"])
    assert res.exit_code == 1
    assert res.output.strip() == f"mfconvert: error: {data}: refusing to overwrite the input's external data {data}; choose another output"
    assert sha256(data) == before and not (tmp_path / "m.mf.onnx").exists()


@pytest.mark.parametrize("flag", ["-o", "--report-json", "--save-config"])
def test_no_output_over_the_inputs_external_data(tmp_path, flag):
    """-o or a side file pointed at the input's data file is refused before any work, --force or not."""
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(np.random.default_rng(0)), path, save_as_external_data=True, location="w.bin")
    data = tmp_path / "w.bin"
    before = sha256(data)
    args = [str(path), "--force", flag, str(data)] + (["-o", str(tmp_path / "o.onnx")] if flag != "-o" else [])
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "refusing to overwrite the external data of" in res.output, res.output
    assert sha256(data) == before and not (tmp_path / "o.onnx").exists()


def test_steps_that_run_the_model_from_memory_refuse_models_over_2gib(tmp_path, monkeypatch):
    """--data runs the model in ONNX Runtime from one serialized protobuf: a model over the limit is
    refused with the reason before any work (the limit lowered to the test model's size)."""
    from mfconvert.convert import onnx_model
    path = tmp_path / "m.onnx"
    onnx.save(mlp(np.random.default_rng(0)), path)
    np.save(tmp_path / "d.npy", np.zeros((8, 256), np.float32))
    monkeypatch.setattr(onnx_model, "HEADROOM", 0)
    monkeypatch.setattr(onnx_model, "PROTO_LIMIT", 100_000)   # the MLP holds 0.6 MB of weights
    res = runner.invoke(app, [str(path), "-o", str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npy")])
    assert res.exit_code == 1 and res.stderr.startswith(
        f"mfconvert: error: {path}: --data runs the model from memory, which protobuf limits to 2 GiB"), res.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("location,length,error", [
    ("../w.bin", None, "is not a file in the model's directory"),
    ("missing.bin", None, "does not exist"),
    ("w.bin", 100, "need 524288 bytes"),
])
def test_bad_external_references_are_one_line_errors(tmp_path, location, length, error):
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(np.random.default_rng(0)), path, save_as_external_data=True, location="w.bin")
    model = onnx.load(path, load_external_data=False)
    ref = {e.key: e for e in model.graph.initializer[0].external_data}
    ref["location"].value = location
    if length is not None:
        ref["length"].value = str(length)
    onnx.save(model, path)
    shutil.copy(tmp_path / "w.bin", tmp_path.parent / "w.bin")   # what '../w.bin' would reach
    res = runner.invoke(app, [str(path), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and line.startswith(f"mfconvert: error: {path}: tensor 'w1': ") and error in line, line
    assert not (tmp_path / "o.onnx").exists()


# Models over 2 GiB: their weights sit in sparse external-data files (zeros cost no disk), with a
# few non-zero values at known places; weights ±2^k and inputs on a 2^-8 grid keep the shift codes
# and the fixed-point arithmetic exact, so ONNX Runtime's output is checked for equality.
GIB = 2 ** 30
WRAP = r"""
import resource, sys
from mfconvert.cli.main import main
sys.argv = ["mfconvert"] + sys.argv[1:]
try:
    main()
finally:
    print(f"maxrss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def external_tensor(name, dims, location) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(int(np.prod(dims)) * 4))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def sparse_file(path, nbytes, values: dict[int, np.ndarray]) -> None:
    """A file of `nbytes` zeros (a hole: no disk) with float32 `values` at the given element offsets."""
    with open(path, "wb") as f:
        f.truncate(nbytes)
        for index, v in values.items():
            f.seek(index * 4)
            f.write(np.asarray(v, np.float32).tobytes())


def pow2_weight(rng, shape) -> np.ndarray:
    """Each column ±2^k with k within 4 of the column's largest: exact 5-bit shift codes."""
    top = rng.integers(-3, 3, shape[1])
    return (rng.choice([-1.0, 1.0], shape) * np.exp2(top - rng.integers(0, 5, shape))).astype(np.float32)


def convert_measured(args) -> tuple[subprocess.CompletedProcess, int]:
    """`mfconvert ARGS` in a fresh process: (the run, its peak RSS in bytes)."""
    run = subprocess.run([sys.executable, "-c", WRAP, *map(str, args)], capture_output=True, text=True, timeout=1800)
    return run, int(run.stderr.rsplit("maxrss_kib=", 1)[1]) * 1024


@pytest.fixture
def big_dir(tmp_path):
    """tmp_path, its gigabyte files deleted afterwards, pass or fail (pytest keeps three runs)."""
    yield tmp_path
    for root, _, files in os.walk(tmp_path):
        for name in files:
            if os.path.getsize(os.path.join(root, name)) > 1 << 20:
                os.unlink(os.path.join(root, name))


def need_disk(path, nbytes) -> None:
    free = shutil.disk_usage(path).free
    if free < nbytes:
        pytest.skip(f"needs {nbytes >> 20} MiB free disk in {path}, has {free >> 20} MiB")


@pytest.mark.slow   # about a minute: 2 GiB read, written and hashed
def test_model_over_2gib_converts(big_dir):
    tmp_path = big_dir
    """Finding 6: a valid model of 2.15 GB, an embedding table in an external-data file and a
    linear layer (was: "Failed to serialize proto"), converts end to end with peak memory under
    3× the model, leaves its input files alone, and runs in ONNX Runtime."""
    need_disk(tmp_path, GIB)
    rng = np.random.default_rng(0)
    vocab, dim, out_dim = 524_800, 1024, 64          # table 524,800 × 1024 × 4 = 2,149,580,800 bytes
    table_bytes = vocab * dim * 4
    assert table_bytes > 2 ** 31 - 1
    rows = {int(i): (rng.integers(-256, 256, dim) / 256) for i in [0, 7, 262_144, vocab - 1]}
    sparse_file(tmp_path / "big.onnx.data", table_bytes, {i * dim: v for i, v in rows.items()})
    w = pow2_weight(rng, (dim, out_dim))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")], "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_dim])],
        [external_tensor("table", [vocab, dim], "big.onnx.data"), numpy_helper.from_array(w, "w")])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    before = {p: sha256(p) for p in (path, tmp_path / "big.onnx.data")}

    out = tmp_path / "out" / "big.mf.onnx"
    out.parent.mkdir()
    run, peak = convert_measured([path, "-o", out, "--report-json", tmp_path / "r.json"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out} (+ {out}.data)" in run.stdout
    print(f"peak RSS {peak / GIB:.2f} GiB = {peak / table_bytes:.2f}× the model")
    # The table is read once into the converted model (1×) and written out tensor by tensor (a
    # second copy of one tensor at a time: 1×); Python, torch and onnx take ~0.5 GiB besides.
    # Measured 2.14× (2026-12-01).
    assert peak < 3 * table_bytes
    assert {p: sha256(p) for p in before} == before
    assert sorted(os.listdir(out.parent)) == ["big.mf.onnx", "big.mf.onnx.data"]   # no temporary files
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["file_bytes_before"] == os.path.getsize(path) + table_bytes
    written = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in written.graph.node] == ["Gather", "ShiftLinear"]
    assert {r["location"] for r in external_tensors(written).values()} == {"big.mf.onnx.data"}
    os.unlink(tmp_path / "big.onnx.data")   # the output needs none of the input's files
    os.unlink(path)

    ids = np.array([7, 0, 3, vocab - 1, 262_144], np.int64)
    table = {i: rows.get(i, np.zeros(dim)) for i in ids}
    want = np.stack([table[i] for i in ids]) @ w.astype(np.float64)
    got = session(str(out), threads=1).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MFCONVERT_LARGE_TESTS"), reason="converts a 2.15 GB weight: "
                    "about 6 minutes on 2 cores; set MFCONVERT_LARGE_TESTS=1")
def test_weight_over_2gib_is_converted(big_dir):
    tmp_path = big_dir
    """A MatMul weight [23200, 23200] float32 (2,152,960,000 bytes) becomes a ShiftLinear, rounded a
    few rows at a time: peak memory under 3× the weight, output exact."""
    need_disk(tmp_path, GIB)
    n = 23_200
    weight_bytes = n * n * 4
    rng = np.random.default_rng(0)
    cols, rows = rng.choice(n, 64, replace=False), rng.integers(0, n, 64)
    values = rng.choice([-1.0, 1.0], 64) * np.exp2(rng.integers(-4, 5, 64))
    sparse_file(tmp_path / "big.onnx.data", weight_bytes,
                {int(i) * n + int(j): v for i, j, v in zip(rows, cols, values)})
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="big")], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                              [external_tensor("w", [n, n], "big.onnx.data")])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    before = {p: sha256(p) for p in (path, tmp_path / "big.onnx.data")}
    out = tmp_path / "out" / "big.mf.onnx"
    out.parent.mkdir()
    run, peak = convert_measured([path, "-o", out])
    assert run.returncode == 0, run.stderr[-2000:]
    print(f"peak RSS {peak / GIB:.2f} GiB = {peak / weight_bytes:.2f}× the weight")
    # The weight is read once (1×) and rounded a few rows at a time, through a transposed view,
    # into 5-bit codes (0.16×, twice: the node's and the exported model's); Python, torch and onnx
    # take ~0.5 GiB (0.25×) besides. Measured 1.90× (2026-12-01).
    assert peak < 2.5 * weight_bytes
    assert {p: sha256(p) for p in before} == before
    assert sorted(os.listdir(out.parent)) == ["big.mf.onnx", "big.mf.onnx.data"]
    os.unlink(tmp_path / "big.onnx.data")

    x = (rng.integers(-2 ** 12, 2 ** 12, (2, n)) / 2 ** 8).astype(np.float32)   # multiples of 2^-8
    want = np.zeros((2, n))
    for i, j, v in zip(rows, cols, values):
        want[:, j] += x[:, i].astype(np.float64) * v
    got = session(str(out), threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want.astype(np.float32))
