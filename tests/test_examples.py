"""The serving examples (examples/): the C++ program built against pip's onnxruntime and the
Python script run on a fully converted model (ShiftLinear + AddLinearAttention + MoE MLP) give
the Python session's outputs bit for bit; Triton's config.pbtxt parses as a ModelConfig."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.ort_ops import library_path
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.runtime import session
from tests.attention_models import TinyViT, export

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A TinyViT with every op of ours in it, and a batch of images, as files."""
    tmp = tmp_path_factory.mktemp("examples")
    torch.manual_seed(0)
    img = torch.randn(3, 3, 32, 32)
    path = export(TinyViT(depth=2).eval(), (img,), tmp / "vit.onnx", dynamo=False, opset=17,
                  input_names=["img"], dynamic_axes={"img": {0: "batch"}})
    cfg = ConvertConfig(shift_linear=ShiftLinearConfig(), add_attention=AddAttentionConfig(), moe_mlp=MoEMLPConfig())
    result = convert_onnx(str(path), cfg, output=str(tmp / "vit.mf.onnx"))
    ops = {n.op_type for n in result.model.graph.node if n.domain == "ai.mfconvert"}
    assert {"ShiftLinear", "AddLinearAttention"} <= ops, ops
    np.save(tmp / "img.npy", img.numpy())
    expected = session(str(tmp / "vit.mf.onnx"), threads=1).run(None, {"img": img.numpy()})[0]
    return tmp, expected


def test_cpp_example_matches_python_session(converted, tmp_path):
    # Same library, same ORT build, one thread each: the same arithmetic in the same order, so
    # the float parts (attention sums, LayerNorm, the Mult expert) must match exactly too.
    if not shutil.which(os.environ.get("CXX", "g++")) or not shutil.which("make"):
        pytest.skip("no C++ compiler (g++ or $CXX) or make to build examples/serve_cpp")
    models, expected = converted
    build = tmp_path / "build"
    subprocess.run(["make", "-s", "-C", str(EXAMPLES / "serve_cpp"), f"BUILD={build}", f"PY={sys.executable}"],
                   check=True, capture_output=True, text=True)
    out = tmp_path / "logits.npy"
    run = subprocess.run([str(build / "serve_cpp"), str(models / "vit.mf.onnx"), library_path(),
                          str(models / "img.npy"), str(out), "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "img -> " in run.stdout and "[3,10]" in run.stdout
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == expected.shape == (3, 10)
    np.testing.assert_array_equal(got, expected)

    # Without our library the model does not load: the registration is what makes it run.
    bad = subprocess.run([str(build / "serve_cpp"), str(models / "vit.mf.onnx"), str(tmp_path / "missing.so"),
                          str(models / "img.npy"), str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("serve_cpp: error:") and "missing.so" in bad.stderr


def test_python_example_matches_session(converted, tmp_path):
    models, expected = converted
    out = tmp_path / "logits.npy"
    run = subprocess.run([sys.executable, str(EXAMPLES / "serve_python.py"), str(models / "vit.mf.onnx"),
                          str(models / "img.npy"), "-o", str(out), "--repeats", "3"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"argmax per row: {expected.argmax(1).tolist()}" in run.stdout
    np.testing.assert_array_equal(np.load(out), expected)


def test_library_path_module_prints_the_library():
    run = subprocess.run([sys.executable, "-m", "mfconvert.ort_ops"], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == library_path() and os.path.isfile(run.stdout.strip())


def _model_config_class():
    """Triton's ModelConfig message: tritonclient's when installed, else the subset of
    model_config.proto that the example uses (same field names, types and enums), so that the
    text format parser still rejects an unknown field, a wrong type or a bad enum value."""
    try:
        from tritonclient.grpc import model_config_pb2
        return model_config_pb2.ModelConfig
    except ImportError:
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="mfconvert_test_model_config.proto", package="mfctest", syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for i, name in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                              "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                              "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dtype.value.add(name=name, number=i)

    def message(name, *fields):
        m = f.message_type.add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, 1):
            m.field.add(name=fname, number=number, type=ftype, label=label, **({"type_name": type_name} if type_name else {}))
        return m

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    tensor = [("name", F.TYPE_STRING, one, ""), ("data_type", F.TYPE_ENUM, one, ".mfctest.DataType"),
              ("dims", F.TYPE_INT64, many, "")]
    message("ModelInput", *tensor)
    message("ModelOutput", *tensor)
    group = message("ModelInstanceGroup", ("name", F.TYPE_STRING, one, ""), ("count", F.TYPE_INT32, one, ""),
                    ("kind", F.TYPE_ENUM, one, ".mfctest.ModelInstanceGroup.Kind"))
    kind = group.enum_type.add(name="Kind")
    for i, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=i)
    message("ModelOperations", ("op_library_filename", F.TYPE_STRING, many, ""))
    message("ModelConfig", ("name", F.TYPE_STRING, one, ""), ("platform", F.TYPE_STRING, one, ""),
            ("backend", F.TYPE_STRING, one, ""), ("max_batch_size", F.TYPE_INT32, one, ""),
            ("input", F.TYPE_MESSAGE, many, ".mfctest.ModelInput"),
            ("output", F.TYPE_MESSAGE, many, ".mfctest.ModelOutput"),
            ("instance_group", F.TYPE_MESSAGE, many, ".mfctest.ModelInstanceGroup"),
            ("model_operations", F.TYPE_MESSAGE, one, ".mfctest.ModelOperations"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mfctest.ModelConfig"))


def test_triton_config_parses_and_names_our_library():
    from google.protobuf import text_format

    cls = _model_config_class()
    text = (EXAMPLES / "triton" / "digit_vit" / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, cls())
    assert cfg.backend == "onnxruntime" and cfg.name == "digit_vit"
    assert [Path(p).name for p in cfg.model_operations.op_library_filename] == [Path(library_path()).name]
    # The interface it declares is the demo ViT's: image [batch, 1, 28, 28] -> logits [batch, 10].
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("image", [1, 28, 28])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [10])]
    with pytest.raises(text_format.ParseError):      # the parser is strict: a misspelt field fails
        text_format.Parse(text.replace("op_library_filename", "op_library_file"), cls())
