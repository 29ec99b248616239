"""The mfconvert command: outputs, refusals and one-line errors with a non-zero exit."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.cli.main import app

runner = CliRunner()


@pytest.fixture
def mlp_path(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.normal(0, .1, (64, 128)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .1, (128, 32)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_default_output_beside_input_and_report(mlp_path):
    before = mlp_path.read_bytes()
    res = runner.invoke(app, [str(mlp_path), "--input-shape", "x=4,64"])
    assert res.exit_code == 0, res.output
    out = mlp_path.with_name("mlp.mf.onnx")
    assert out.exists() and mlp_path.read_bytes() == before
    assert "layers converted: 2" in res.output
    assert "multiplications removed per inference at x=[4, 64]: 49.15k" in res.output  # 4·(64·128+128·32)
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node] == ["ShiftLinear", "Relu", "ShiftLinear"]
    # A second run refuses to replace the output unless told to.
    again = runner.invoke(app, [str(mlp_path)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    assert runner.invoke(app, [str(mlp_path), "--force"]).exit_code == 0


def test_shift_terms(mlp_path, tmp_path):
    out = tmp_path / "two.onnx"
    res = runner.invoke(app, [str(mlp_path), "-o", str(out), "--shift-terms", "2"])
    assert res.exit_code == 0 and "32.00 KiB→10.12 KiB" in res.output   # 2 terms × 5 bits + exponents
    nodes = [n for n in onnx.load(out).graph.node if n.op_type == "ShiftLinear"]
    assert [helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "terms"] == [2, 2]


def test_never_overwrites_the_input(mlp_path):
    before = mlp_path.read_bytes()
    res = runner.invoke(app, [str(mlp_path), "-o", str(mlp_path), "--force"])
    assert res.exit_code == 1 and "refusing to overwrite the input model" in res.output
    assert mlp_path.read_bytes() == before


def test_exclude_and_no_shift_linear(mlp_path, tmp_path):
    res = runner.invoke(app, [str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--exclude", "fc2"])
    assert res.exit_code == 0 and "fc2 (shift-linear): excluded by --exclude 'fc2'" in res.output
    res = runner.invoke(app, [str(mlp_path), "--no-shift-linear", "--no-add-attention", "--no-shift-conv"])
    assert res.exit_code == 1 and "every pass is turned off" in res.output


@pytest.mark.parametrize("args,message", [
    (["--weight-bits", "9"], "--weight-bits must be in [2, 5], got 9"),
    (["--exclude", "("], "--exclude '(' is not a valid regular expression"),
    (["--input-shape", "x=a,b"], "--input-shape 'x=a,b': expected NAME=D0,D1"),
    (["--shift-terms", "5"], "--shift-terms must be in [1, 4], got 5"),
    (["--min-params", "100000"], "nothing to convert (2 candidates skipped: fc1: tiny layer"),
])
def test_bad_flags_are_one_line_errors(mlp_path, args, message):
    res = runner.invoke(app, [str(mlp_path), "--dry-run", *args])
    assert res.exit_code == 1
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_truncated_and_garbage_files(tmp_path, mlp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp_path.read_bytes()[:300])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(2048))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty, tmp_path / "missing.onnx"):
        res = runner.invoke(app, [str(path)])
        assert res.exit_code == 1, (path, res.output)
        assert str(path) in res.output and len(res.output.strip().splitlines()) == 1
        assert not path.with_name(path.stem + ".mf.onnx").exists()


def test_entry_point_runs_as_a_program(mlp_path, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mfconvert")
    ok = subprocess.run([exe, str(mlp_path), "-o", str(tmp_path / "a.onnx")], capture_output=True, text=True)
    assert ok.returncode == 0 and "layers converted: 2" in ok.stdout
    bad = subprocess.run([exe, str(tmp_path / "nope.onnx")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == f"mfconvert: error: {tmp_path / 'nope.onnx'}: no such file"


def test_data_alone_gives_error_compensated_rounding(mlp_path, tmp_path):
    """`--data` re-rounds the shift weights on it: a smaller output error on inputs it never saw."""
    from mfconvert.runtime import session

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(1024, 64)) @ (np.eye(64) + rng.normal(size=(64, 64)) / 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x[:512])
    plain, rounded = tmp_path / "plain.onnx", tmp_path / "rounded.onnx"
    assert runner.invoke(app, [str(mlp_path), "-o", str(plain)]).exit_code == 0
    res = runner.invoke(app, [str(mlp_path), "-o", str(rounded), "--data", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    assert "re-rounded by error-compensated rounding on 256 examples" in res.output
    held_out = {"x": x[512:]}
    reference = session(str(mlp_path)).run(None, held_out)[0]
    errors = [np.linalg.norm(session(str(p)).run(None, held_out)[0] - reference) for p in (plain, rounded)]
    # Measured: 0.71× the error of nearest rounding (256 calibration rows for 64/128 inputs).
    assert errors[1] < 0.8 * errors[0]
    res = runner.invoke(app, [str(mlp_path), "--dry-run", "--data", str(tmp_path / "x.npy"), "--rounding", "nearest"])
    assert res.exit_code == 1 and "--data with --rounding nearest is for" in res.output
    res = runner.invoke(app, [str(mlp_path), "--dry-run", "--rounding", "best"])
    assert res.exit_code == 1 and "--rounding must be compensated or nearest, got 'best'" in res.output
