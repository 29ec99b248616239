"""--moe-mlp on a timm-style ViT from both torch exporters (TorchScript: GELU as Div/Erf/Add/Mul;
dynamo at opset 21: one Gelu op): every MLP becomes an MoE block and the model runs; forced
all-Mult routing reproduces the exported model."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.moe import routing_split
from mfconvert.runtime import session
from tests.attention_models import TinyViT, export

EXPORTS = [(False, 13), (False, 17), (True, 18), (True, 21)]   # (dynamo, opset)


@pytest.mark.parametrize("dynamo, opset", EXPORTS, ids=[f"{'dynamo' if d else 'torchscript'}{o}" for d, o in EXPORTS])
def test_every_vit_mlp_converts_and_runs(tmp_path, dynamo, opset):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    path = export(TinyViT(depth=3).eval(), (img,), tmp_path / "vit.onnx", dynamo=dynamo, opset=opset,
                  input_names=["img"], dynamic_axes={"img": {0: "batch"}})
    feeds = {"img": img.numpy()}
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    result = convert_onnx(str(path), ConvertConfig(moe_mlp=MoEMLPConfig()))
    moe = next(r for r in result.report.results if r.pass_name == "moe-mlp")
    assert len(moe.changes) == 6 and not moe.skips and all("48→96→48, GELU)" in c.detail for c in moe.changes)
    got = session(result.model.SerializeToString(), threads=2).run(None, feeds)[0]
    assert got.shape == original.shape and np.isfinite(got).all()
    splits = routing_split(result.model, feeds)
    assert len(splits) == 3 and all(s.mult + s.shift == 2 * 17 for s in splits.values())

    forced = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                           moe_mlp=MoEMLPConfig(router_std=0.0, router_bias=-30.0))
    got = session(convert_onnx(str(path), forced).model.SerializeToString(), threads=2).run(None, feeds)[0]
    np.testing.assert_allclose(got, original, rtol=0, atol=1e-5)   # float32 rounding; measured ~1e-6
