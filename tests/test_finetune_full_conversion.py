"""Finetuning fully converted models (shift linear + add attention + MoE MLP): OnnxModule runs
every op the conversion emits as ORT does, trains, writes every trained value back, and the MoE
load-balancing loss moves the routing toward the latency-balanced split while distillation works."""
import numpy as np
import onnx
import pytest
import torch

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.moe import router_logits, routes
from mfconvert.nn import AddLinearAttention
from mfconvert.nn.onnx_module import OnnxModule
from mfconvert.runtime import session
from tests.attention_models import TinyViT, export
from tests.test_add_attention_kernel import FINFO_MIN, op_model, tolerance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_ort(model, feeds, outputs=None):
    return session(model.SerializeToString(), threads=1).run(outputs, feeds)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(teacher path, fully converted student, images): a 2-block timm-style ViT, random weights."""
    torch.manual_seed(0)
    img = torch.randn(6, 3, 32, 32)
    path = export(TinyViT(depth=2).eval(), (img,), tmp_path_factory.mktemp("vit") / "vit.onnx", dynamo=False,
                  opset=17, input_names=["img"], dynamic_axes={"img": {0: "batch"}})
    student = convert_onnx(str(path), ConvertConfig(moe_mlp=MoEMLPConfig())).model
    return str(path), student, img


def with_routes_as_outputs(model):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in routes(model).values():
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.INT64, None))
    return probe


def test_fully_converted_vit_runs_like_ort_and_writes_back_after_training(vit):
    _, student, img = vit
    ops = {n.op_type for n in student.graph.node}
    assert {"ShiftLinear", "AddLinearAttention", "Compress", "NonZero", "ScatterND", "ArgMax"} <= ops
    module = OnnxModule(student).eval()
    assert len(module.attention_layers()) == 2
    logits = router_logits(student)
    with torch.no_grad():
        out, captured = module(capture=tuple(logits.values()), img=img)
    ref = run_ort(with_routes_as_outputs(student), {"img": img.numpy()})
    # Every token takes the same expert in both (the router is a float Gemm: equal argmax unless
    # two logits tie within rounding, which these inputs do not come near).
    for got, route in zip(captured.values(), ref[1:]):
        np.testing.assert_array_equal(got.argmax(-1, keepdim=True).numpy(), route)
    # The attention codes are computed in float64 in both (equal bits); ShiftLinear's Q16.16
    # activation floor turns a float32 rounding difference upstream into one LSB (2⁻¹⁶ ≈ 1.5e-5)
    # times a weight ≤ 1 on a few elements. Measured max |diff| 4.7e-5 on logits of max |y| 1.3.
    np.testing.assert_allclose(out[0].numpy(), ref[0], rtol=0, atol=3e-4)

    # A few training steps with a grid conv added (zero-initialised, then trained): everything
    # trained goes back into the ONNX — shift codes, attention conv, router and float expert.
    module.train()
    for layer in module.attention_layers().values():
        layer.add_conv("grid", grid=(4, 4), prefix_tokens=1)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        loss = module(img=img)[0].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = module.eval().to_onnx()
    onnx.checker.check_model(trained)
    attention = [n for n in trained.graph.node if n.op_type == "AddLinearAttention"]
    assert all(len(n.input) == 5 and n.input[4] for n in attention)
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
               == {"num_heads": 3, "binarizer": b"sign", "grid_h": 4, "grid_w": 4, "prefix_tokens": 1}
               for n in attention)
    before = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in trained.graph.initializer}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert any("router.weight" in n for n in changed) and any("mult.fc1.weight" in n for n in changed)
    assert any(n.endswith(".codes") for n in changed)
    with torch.no_grad():
        got = module(img=img)[0].numpy()
    np.testing.assert_allclose(got, run_ort(trained, {"img": img.numpy()})[0], rtol=0, atol=3e-4)
    # And a new OnnxModule of the written model computes the same (the round trip is closed).
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModule(trained).eval()(img=img)[0].numpy(), got, rtol=0, atol=1e-6)


ATTENTION_CASES = [  # binarizer, conv, with K, mask
    ("sign", None, True, None),
    ("sign", "tokens", True, "additive"),
    ("sign", "grid", False, None),          # K absent: shared with Q
    ("ksh", "tokens", False, "additive"),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_node_variants_execute_like_the_kernel_and_round_trip(case):
    binz, conv, with_k, masking = case
    b, t, h, d = 2, 17, 2, 8
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layer = AddLinearAttention(h * d, h, binarizer=binz, conv=conv, grid=(4, 4), prefix_tokens=1)
    if binz == "ksh":
        layer.binarizer.iterations = 10
    if conv:
        torch.nn.init.normal_(layer.conv_weight)
    q, k, v = (torch.from_numpy(rng.normal(size=(b, t, h * d)).astype(np.float32)) for _ in range(3))
    mask = None
    if masking:
        mask = torch.zeros(b, 1, 1, t)
        mask[0, ..., 10:] = FINFO_MIN
    kin = k if with_k else None
    with torch.no_grad():
        layer.core(q, kin, v, mask)                    # fits the binariser
        if binz == "sign":
            layer.binarizer.q_threshold.normal_(0, 0.05)
    model = op_model(layer, with_k=with_k, with_mask=mask is not None)
    feeds = {"Q": q.numpy(), "V": v.numpy(), **({"K": k.numpy()} if with_k else {}),
             **({"mask": mask.numpy()} if mask is not None else {})}
    module = OnnxModule(model).eval()
    with torch.no_grad():
        got = module(**feeds)[0].numpy()
    # The kernel's parity bound of docs/ops.md (float32 sums in another order).
    assert (np.abs(got - run_ort(model, feeds)[0]) - tolerance(layer, q, kin, v, mask)).max() <= 0
    consts = layer.onnx_constants()
    written = {i.name: onnx.numpy_helper.to_array(i) for i in module.to_onnx().graph.initializer}
    for index, value in consts.items():
        np.testing.assert_array_equal(written[f"c{index}"], value)


def test_unknown_binarizer_is_an_error_naming_the_node():
    from mfconvert.nn.onnx_module import UnsupportedOp
    model = op_model(AddLinearAttention(8, 2, conv=None), with_mask=False, attrs={"num_heads": 2, "binarizer": "xor"})
    with pytest.raises(UnsupportedOp, match="node 'attn0': binarizer must be one of"):
        OnnxModule(model)


def test_balancing_loss_moves_the_split_toward_the_latency_target_while_distillation_works(vit):
    teacher, _, _ = vit
    # Routers start sending ~2 % of tokens to Shift; latencies (1, 1) put the target at 50 %.
    student = convert_onnx(teacher, ConvertConfig(moe_mlp=MoEMLPConfig(router_std=1.0, router_bias=-3.0))).model
    rng = np.random.default_rng(0)
    data = Examples([{"img": x} for x in rng.normal(size=(96, 3, 32, 32)).astype(np.float32)])
    shares = {}
    for coef in (1.0, 0.0):
        cfg = FinetuneConfig(steps=40, lr=3e-3, batch_size=32, loss="mse", balance_coef=coef,
                             expert_latency=(1.0, 1.0), progress=False)
        result = finetune(student, onnx.load(teacher), data, cfg)
        share = [np.mean(list(s.values())) for s in result.shift_fractions]
        shares[coef] = share[0], np.mean(share[-5:])
        # Measured: the distillation loss (balancing term excluded) falls 0.06 → 0.03 with the
        # balancing loss, → 0.01 without it (Shift tokens cost fidelity; Mult is the original MLP).
        assert np.mean(result.distill_losses[-5:]) < 0.7 * np.mean(result.distill_losses[:5])
        assert len(result.losses) == len(result.distill_losses) == len(result.shift_fractions) == 40
    # Measured: with the balancing loss the share to Shift goes 0.02 → 0.51; without, 0.02 → 0.005.
    assert shares[1.0][0] < 0.1 and abs(shares[1.0][1] - 0.5) < 0.15, shares
    assert shares[0.0][1] < 0.1, shares


def test_cli_reports_the_routing_split_after_finetuning(vit, tmp_path):
    from typer.testing import CliRunner
    from mfconvert.cli.finetune import app
    teacher, student, _ = vit
    path = tmp_path / "vit.mf.onnx"
    onnx.save(student, path)
    data = tmp_path / "img.npz"
    np.savez(data, img=np.random.default_rng(0).normal(size=(40, 3, 32, 32)).astype(np.float32))
    res = CliRunner().invoke(app, [str(path), "--teacher", teacher, "--data", str(data), "--steps", "3",
                                   "--batch-size", "16", "--expert-latency", "1,3", "--attention-conv", "grid:4x4+1"])
    assert res.exit_code == 0, res.output
    assert "MoE routing after finetuning (balanced target: 25.0 % to Shift):" in res.output
    assert "mult tokens  shift tokens" in res.output and res.output.count("/moe") == 0
    lines = res.output.splitlines()
    table = lines[lines.index(next(l for l in lines if "mult tokens" in l)) + 1:][:2]
    assert all(int(l.split()[1]) + int(l.split()[2]) == 4 * 17 for l in table)   # 4 held-out images × 17 tokens
    for args, message in [(["--expert-latency", "1"], "--expert-latency must be 'MULT,SHIFT'"),
                          (["--attention-conv", "grid:4"], "--attention-conv must be 'tokens' or 'grid:HxW+P'")]:
        res = CliRunner().invoke(app, [str(path), "--teacher", teacher, "--data", str(data), *args])
        assert res.exit_code == 1 and message in res.output, res.output
