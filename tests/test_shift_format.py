"""One ShiftLinear format (passes/shift_format.py) for every path that makes shift layers: `terms`
survives the pass, nn/swap.py, the executor, finetuning and the MoE's Shift expert; and
--max-drop measures and keeps an MoE block's fc2 with its block."""
import copy
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.evaluate import model_outputs
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.calibrate.sensitivity import convert_within_budget, drop
from mfconvert.cli.main import app
from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.nn import ShiftMoEMLP
from mfconvert.nn.onnx_module import OnnxModule
from mfconvert.nn.swap import shift_linears
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.runtime import session
from tests import numpy_reference as ref

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, HIDDEN = 24, 64


def export(net, path, d=D):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # TorchScript exporter deprecation notice
        torch.onnx.export(net.eval(), (torch.randn(1, 3, d),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    return str(path)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """fc1 → ReLU → fc2 (ReLU keeps the Shift path exact) and its ONNX file."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, D))
    return net, export(net, tmp_path_factory.mktemp("fmt") / "mlp.onnx")


def ort(model, x):
    return session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]


def shift_attrs(model):
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "ShiftLinear"}


def inputs(seed=0, n=40):
    return np.random.default_rng(seed).standard_normal((2, n // 2, D)).astype(np.float32)


def test_both_configs_are_one_format_and_json_keeps_flat_keys():
    for kind in (ShiftLinearConfig, MoEMLPConfig):
        assert issubclass(kind, ShiftFormat)
        assert kind(terms=2, weight_bits=3).shift_format == ShiftFormat(weight_bits=3, terms=2)
        with pytest.raises(ValueError, match=r"terms must be in \[1, 4\], got 5"):
            kind(terms=5)
        with pytest.raises(ValueError, match="weight_scale must be one of"):
            kind(weight_scale="row")
    cfg = ConvertConfig(shift_linear=ShiftLinearConfig(terms=3), moe_mlp=MoEMLPConfig(terms=2, router_std=1.0))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["moe_mlp"]["terms"] == 2 and data["shift_linear"]["terms"] == 3   # flat keys, as before
    assert ConvertConfig.from_dict(data) == cfg
    # A config written before the MoE had `terms` still loads, with one term.
    old = {"version": 1, "moe_mlp": {"weight_bits": 4, "act_bits": 32, "act_frac_bits": 16,
                                     "weight_scale": "channel", "router_std": 10.0}}
    assert ConvertConfig.from_dict(old).moe_mlp.terms == 1
    with pytest.raises(ValueError, match=r"moe_mlp\.terms must be an integer"):
        ConvertConfig.from_dict({"moe_mlp": {"terms": "2"}})


def test_pass_swap_and_executor_keep_two_terms(mlp):
    net, path = mlp
    cfg = ShiftLinearConfig(terms=2, min_params=0)
    converted = convert_onnx(path, ConvertConfig(shift_linear=cfg, add_attention=None)).model
    attrs = shift_attrs(converted)
    assert len(attrs) == 2 and all(a["terms"] == 2 for a in attrs.values())
    x = inputs()
    want = ort(converted, x)

    swapped = copy.deepcopy(net)
    assert shift_linears(swapped, cfg) == ["0", "2"]
    assert [swapped[i].terms for i in (0, 2)] == [2, 2]
    assert swapped[0].codes().shape == (2, HIDDEN, D)
    with torch.no_grad():
        # Same greedy rounding of the same float32 weights, and the integer path is the kernel's.
        np.testing.assert_array_equal(swapped.eval()(torch.from_numpy(x)).numpy(), want)
        one_term = copy.deepcopy(net)
        shift_linears(one_term, ShiftLinearConfig(min_params=0))
        assert not np.array_equal(one_term.eval()(torch.from_numpy(x)).numpy(), want)

    module = OnnxModule(converted).eval()
    assert all(m.terms == 2 for m in module.modules() if type(m).__name__ == "ShiftLinear")
    with torch.no_grad():
        np.testing.assert_array_equal(module(x=torch.from_numpy(x))[0].numpy(), want)


def test_finetuning_writes_two_terms_back(mlp, tmp_path):
    _, path = mlp
    student = convert_onnx(path, ConvertConfig(shift_linear=ShiftLinearConfig(terms=2, min_params=0),
                                               add_attention=None)).model
    examples = Examples([{"x": row} for row in inputs(1, 256).reshape(-1, 4, D)])
    out = str(tmp_path / "ft.onnx")
    finetune(student, onnx.load(path), examples,
             FinetuneConfig(steps=2, batch_size=8, lr=1e-3, progress=False), output=out)
    written = onnx.load(out)
    attrs = shift_attrs(written)
    assert len(attrs) == 2 and all(a["terms"] == 2 for a in attrs.values())
    init = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    codes = {n.name: init[n.input[1]] for n in written.graph.node if n.op_type == "ShiftLinear"}
    assert sorted(c.size for c in codes.values()) == sorted([2 * D * HIDDEN * 5 // 8] * 2)
    x = inputs(2)
    with torch.no_grad():
        np.testing.assert_array_equal(OnnxModule(written).eval()(x=torch.from_numpy(x))[0].numpy(), ort(written, x))


def moe_reference(w1, b1, w2, b2, x, terms, router_w, router_b):
    """The MoE block by tests/numpy_reference.py with a `terms`-term Shift expert: the op with T
    terms is the one-term op over X repeated T times (docs/ops.md#two-or-more-terms)."""
    def shift(v, w, b):
        e = ref.channel_exponent(w)
        codes = ref.round_weight_terms(w, e, 5, terms)
        sign, m = (np.concatenate([c[k] for c in codes], axis=1) for k in (0, 1))
        return ref.shift_linear(np.tile(v, terms), sign, m, e, b, 5, 32, 16)
    x2 = x.reshape(-1, D)
    _, expert, gate = ref.moe_route(x2, router_w, router_b)
    e_shift = shift(np.maximum(shift(x2, w1, b1), 0), w2, b2).astype(np.float64)
    e_mult = np.maximum(x2.astype(np.float64) @ w1.T + b1, 0) @ w2.T + b2
    return gate[:, None] * np.where(expert[:, None] == 1, e_shift, e_mult), expert, e_shift


def test_moe_shift_terms_2_gives_two_term_experts(mlp, tmp_path):
    net, path = mlp
    w1, b1, w2, b2 = (p.detach().numpy() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    out, saved = tmp_path / "moe.onnx", tmp_path / "cfg.json"
    res = CliRunner().invoke(app, [path, "-o", str(out), "--moe-mlp", "--shift-terms", "2", "--no-add-attention",
                                   "--save-config", str(saved)])
    assert res.exit_code == 0, res.output
    converted = onnx.load(out)
    attrs = shift_attrs(converted)
    assert len(attrs) == 2 and all("/moe/shift.fc" in name and a["terms"] == 2 for name, a in attrs.items())
    assert json.loads(saved.read_text())["moe_mlp"]["terms"] == 2

    # Default router (std 10): both experts take tokens. The Shift expert is exact integer
    # arithmetic (ReLU between), so a Shift token differs from the reference only by the gate:
    # float32 softmax against float64, a few ulps (≤ 1e-6 relative). A Mult token adds float32
    # matrix products against float64: (n + 1)·2⁻²⁴·Σ|terms| ≤ 1e-5 of the output scale here.
    init = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    router_w = next(v for k, v in init.items() if k.endswith("router.weight"))
    router_b = next(v for k, v in init.items() if k.endswith("router.bias"))
    x = inputs(5, 400)
    got = ort(converted, x).reshape(-1, D)
    want, expert, _ = moe_reference(w1, b1, w2, b2, x, 2, router_w, router_b)
    assert 0 < expert.sum() < len(expert)
    shift_rows = expert == 1
    np.testing.assert_allclose(got[shift_rows], want[shift_rows], rtol=1e-6, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    one_term, _, _ = moe_reference(w1, b1, w2, b2, x, 1, router_w, router_b)
    assert np.abs(got - one_term)[shift_rows].max() > 100 * np.abs(got - want)[shift_rows].max()

    # Every token to Shift (gate softmax([0, 30])[1] = 1 in float32): the ONNX block and
    # ShiftMoEMLP.from_mlp both equal the two-term reference bit for bit.
    cfg = json.loads(saved.read_text())
    cfg["moe_mlp"].update(router_std=0.0, router_bias=30.0)
    saved.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, [path, "-o", str(out), "--config", str(saved), "--force"])
    assert res.exit_code == 0, res.output
    _, _, e_shift = moe_reference(w1, b1, w2, b2, x, 2, np.zeros((2, D), np.float32), np.array([0, 30.0]))
    np.testing.assert_array_equal(ort(onnx.load(out), x).reshape(-1, D), e_shift.astype(np.float32))
    layer = ShiftMoEMLP.from_mlp(net[0], net[1], net[2], terms=2, router_std=0.0, router_bias=30.0).eval()
    assert layer.experts[1][0].terms == layer.experts[1][2].terms == 2
    with torch.no_grad():
        np.testing.assert_array_equal(layer(torch.from_numpy(x)).numpy().reshape(-1, D), e_shift.astype(np.float32))


def test_max_drop_measures_and_keeps_an_moe_block_whole(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, D),
                              torch.nn.Tanh(), torch.nn.Linear(D, 48))
    path = export(net, tmp_path / "net.onnx")
    examples = Examples([{"x": row} for row in inputs(7, 128).reshape(-1, 1, D)])
    # Ternary codes, every token to Shift: every conversion is lossy.
    config = ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=2, min_params=0), add_attention=None,
                           moe_mlp=MoEMLPConfig(weight_bits=2, router_std=0.0, router_bias=30.0))
    reference = model_outputs(path, examples)
    full = drop(reference, model_outputs(convert_onnx(path, config).model, examples), logits=False)
    # Measured: the block alone drops 0.139, the head alone 0.085, both 0.242; a budget of half
    # keeps the block float (both its layers) and converts the head.
    result = convert_within_budget(path, config, examples, max_drop=full / 2)
    by_pass = {}
    for s in result.sensitivities:
        by_pass.setdefault(s.pass_name, []).append(s)
    fc1, fc2 = by_pass["moe-mlp"]
    assert fc2.node != fc1.node and fc2.target == fc1.node
    # fc2 converts with its block: its drop is the block's, measured by converting the block alone.
    only = ConvertConfig(shift_linear=None, add_attention=None,
                         moe_mlp=MoEMLPConfig(weight_bits=2, router_std=0.0, router_bias=30.0,
                                              include=[f"^{fc1.node}$"]))
    alone = drop(reference, model_outputs(convert_onnx(path, only).model, examples), logits=False)
    assert fc2.error == fc1.error == pytest.approx(alone, rel=1e-9) and alone > 0
    assert len(by_pass["shift-linear"]) == 1 and by_pass["shift-linear"][0].error > 0
    assert result.error <= full / 2 < full
    kept = result.kept_float
    assert kept == result.sensitivities[:len(kept)] and 0 < len(kept) < 3
    ops = [n.op_type for n in result.result.model.graph.node]
    moe_kept = fc1 in kept
    assert (fc2 in kept) == moe_kept                       # the block stays float whole, or converts whole
    assert ops.count("ArgMax") == (0 if moe_kept else 1)
    head_kept = by_pass["shift-linear"][0] in kept
    assert moe_kept and not head_kept                      # as measured above
    assert ops.count("ShiftLinear") == (0 if moe_kept else 2) + (0 if head_kept else 1)
    assert result.error == pytest.approx(drop(reference, model_outputs(result.result.model, examples),
                                              logits=False))


def test_pipeline_shift_terms_sets_every_shift_pass(mlp, tmp_path):
    """PipelineOptions.shift_terms as the Python API's --shift-terms: an integer sets the terms of
    every shift-weighted pass (a config asking for 1 term gets 2), None keeps the config's, and a
    value out of range is a one-line error naming the option. The 2-term model equals the NumPy
    two-term reference bit for bit (exact integer arithmetic, ReLU between the layers)."""
    from mfconvert.convert.pipeline import PipelineOptions, convert_model, with_fixed_terms

    net, path = mlp
    config = ConvertConfig(shift_linear=ShiftLinearConfig(terms=1), add_attention=None, moe_mlp=None)
    two = convert_model(path, config, PipelineOptions(shift_terms=2)).result.model
    assert [a["terms"] for a in shift_attrs(two).values()] == [2, 2]
    kept = convert_model(path, ConvertConfig(shift_linear=ShiftLinearConfig(terms=3), add_attention=None, moe_mlp=None),
                         PipelineOptions(shift_terms=None)).result.model
    assert [a["terms"] for a in shift_attrs(kept).values()] == [3, 3]
    w1, b1, w2, b2 = (p.detach().numpy() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    def shift2(v, w, b):
        e = ref.channel_exponent(w)
        sign, m = (np.concatenate([c[k] for c in ref.round_weight_terms(w, e, 5, 2)], axis=1) for k in (0, 1))
        return ref.shift_linear(np.tile(v, 2), sign, m, e, b, 5, 32, 16)
    x = inputs(2)
    want = shift2(np.maximum(shift2(x.reshape(-1, D), w1, b1), 0), w2, b2)
    np.testing.assert_array_equal(ort(two, x).reshape(-1, D), want)
    with pytest.raises(ValueError, match="^shift_terms: .*terms"):
        with_fixed_terms(config, 9)
    with pytest.raises(ValueError, match="^shift_terms must be"):
        with_fixed_terms(config, "two")
