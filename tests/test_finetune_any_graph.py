"""Finetuning, --data calibration and evaluation of graphs other people export (issue 11, item 7):
several outputs with a token-level first one whose length varies by batch, `--outputs`, and a
model that fixes its batch size to 1. Models built with onnx.helper; figures checked against
ONNX Runtime run one example at a time (no padding) and NumPy."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mfconvert.calibrate.data import (Examples, chunks, fixed_batch, load_examples, model_fixed_batch,
                                      run_chunked)
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.cli.finetune import app as finetune_app
from mfconvert.cli.main import app as convert_app
from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.runtime import session
from mfconvert.zoo.minilm import model_dir

TOKENIZER = str(model_dir() / "tokenizer.json")
C, H, K = 32, 64, 6
FLOAT_OUTPUTS = ["token_embeddings", "sentence_embedding", "normalized", "logits"]


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def sentence_model(path) -> None:
    """A sentence-transformers-like graph: token_embeddings [B, T, C] (T dynamic), the masked
    mean sentence_embedding [B, C], its L2-normalised copy, class logits [B, K], and an int64
    token count [B] (not a float output: never distilled)."""
    rng = np.random.default_rng(0)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w1"], ["h0"], name="mlp_in"),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mlp_out"),
        helper.make_node("Add", ["h3", "emb"], ["token_embeddings"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "minus1"], ["m3"]),
        helper.make_node("Mul", ["token_embeddings", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["m", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["sentence_embedding"]),
        helper.make_node("LpNormalization", ["sentence_embedding"], ["normalized"], axis=-1, p=2),
        helper.make_node("MatMul", ["sentence_embedding", "w3"], ["l0"], name="head"),
        helper.make_node("Add", ["l0", "b3"], ["logits"]),
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["n_tokens"], keepdims=0),
    ]
    inits = [_init("table", rng.standard_normal((30522, C)).astype(np.float32)), _init("w1", f(C, H)),
             _init("b1", f(H)), _init("w2", f(H, C)), _init("w3", f(C, K * 32)[:, :K].copy()),
             _init("b3", f(K)), _init("one", np.array([1], np.int64)), _init("minus1", np.array([-1], np.int64))]
    # w3 is [C, K] = 192 weights: below min_params, so the head stays float.
    graph = helper.make_graph(
        nodes, "sentence", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "seq", C]),
         helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", C]),
         helper.make_tensor_value_info("normalized", TensorProto.FLOAT, ["batch", C]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K]),
         helper.make_tensor_value_info("n_tokens", TensorProto.INT64, ["batch"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def batch_one_model(path, batch=1) -> None:
    """An old exporter's MLP: input [1, 16] static and a Reshape to the constant [1, 64]
    (`batch` None: the same graph with a dynamic batch, for comparison)."""
    rng = np.random.default_rng(1)
    dims = [batch if batch else "n", 16]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"), helper.make_node("Add", ["a", "b1"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["c"]), helper.make_node("Tanh", ["c"], ["d"]),
             helper.make_node("MatMul", ["d", "w2"], ["e"], name="fc2"), helper.make_node("Add", ["e", "b2"], ["y"])]
    inits = [_init("w1", rng.standard_normal((16, 64)).astype(np.float32) / 4),
             _init("b1", rng.standard_normal(64).astype(np.float32) / 4),
             _init("shape", np.array([batch or -1, 64], np.int64)),
             _init("w2", rng.standard_normal((64, 32)).astype(np.float32) / 8),
             _init("b2", rng.standard_normal(32).astype(np.float32) / 4)]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch or "n", 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


WORDS = ("the cat sat on a mat while every dog in town barked at passing cars and "
         "nobody could sleep through the night because of it").split()


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("any_graph")
    teacher, student, text = str(tmp / "sent.onnx"), str(tmp / "sent.mf.onnx"), tmp / "sentences.txt"
    sentence_model(teacher)
    convert_onnx(teacher, ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=3)), output=student)
    rng = np.random.default_rng(2)
    text.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(2, 30))) for _ in range(80)) + "\n")
    return teacher, student, str(text)


@pytest.fixture(scope="module")
def batch_one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch_one")
    paths = {k: str(tmp / f"{k}.onnx") for k in ("teacher", "student", "twin", "twin_student")}
    batch_one_model(paths["teacher"])
    batch_one_model(paths["twin"], batch=None)
    cfg = ConvertConfig(shift_linear=ShiftLinearConfig(weight_bits=3, min_params=512))
    convert_onnx(paths["teacher"], cfg, output=paths["student"])
    convert_onnx(paths["twin"], cfg, output=paths["twin_student"])
    x = np.random.default_rng(3).standard_normal((120, 16)).astype(np.float32)
    np.savez(tmp / "x.npz", x=x)
    return paths, Examples([{"x": row} for row in x]), str(tmp / "x.npz")


def test_fixed_batch_and_pieces():
    assert fixed_batch([[1, 16]]) == 1 and fixed_batch([[1, 128], [1, 128]]) == 1
    assert fixed_batch([["batch", 16]]) is None and fixed_batch([[None, 3]]) is None
    assert fixed_batch([[1, 8], [4, 8]]) is None and fixed_batch([[], [2, 3]]) == 2
    batch = {"x": np.arange(10).reshape(5, 2)}
    pieces = chunks(batch, 2)
    assert [real for _, real in pieces] == [2, 2, 1]
    np.testing.assert_array_equal(pieces[2][0]["x"], [[8, 9], [8, 9]])   # filled with its last row
    assert chunks(batch, None)[0][0] is batch
    # pieces joined as one run of the whole batch: [B, …], tokens flattened to [B·T], a scalar
    run = lambda feeds: [feeds["x"] * 2, feeds["x"].reshape(-1), np.float32(3)]  # noqa: E731
    for got, want in zip(run_chunked(run, batch, 2), run(batch)):
        np.testing.assert_array_equal(got, want)


def test_fidelity_per_example_matches_unbatched_numpy(sentences):
    """model_outputs over padded batches of varying T equals ORT run on each example alone, and
    fidelity's cosine (per example, averaged) and SQNR (over every value) equal NumPy's."""
    teacher, student, text = sentences
    examples = load_examples(text, ["input_ids", "attention_mask"], tokenizer=TOKENIZER)
    held = Examples(examples.items[:24], examples.pad_values)
    ref, test = model_outputs(teacher, held, batch_size=7), model_outputs(student, held, batch_size=7)
    assert ref.names == FLOAT_OUTPUTS
    alone = {k: session(p) for k, p in (("ref", teacher), ("test", student))}
    singles = {k: [s.run(FLOAT_OUTPUTS, {n: v[None] for n, v in item.items()}) for item in held.items]
               for k, s in alone.items()}
    figures = fidelity(ref, test)
    for o, name in enumerate(FLOAT_OUTPUTS):
        r = [v[o][0] for v in singles["ref"]]
        t = [v[o][0] for v in singles["test"]]
        for i in range(len(held)):   # real tokens only: the padded batch row equals the lone run
            np.testing.assert_allclose(ref.rows[name][i], r[i], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(test.rows[name][i], t[i], rtol=1e-4, atol=1e-5)
        r, t = [a.astype(np.float64).ravel() for a in r], [b.astype(np.float64).ravel() for b in t]
        cos = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(r, t)])
        signal = sum(a @ a for a in r)
        noise = sum((a - b) @ (a - b) for a, b in zip(r, t))
        got = figures["per_output"][name]
        # float32 outputs of the batched and lone runs differ by ~1e-6 relative: far below 1e-4
        assert got["mean_cosine"] == pytest.approx(cos, abs=1e-4)
        assert got["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=1e-2)
    assert "nn_agreement" not in figures["per_output"]["token_embeddings"]   # rows of different sizes
    assert figures["mean_cosine"] == pytest.approx(np.mean([f["mean_cosine"] for f in figures["per_output"].values()]))
    logits = fidelity(model_outputs(teacher, held, outputs=["logits"]),
                      model_outputs(student, held, outputs=["logits"]), logits=True)
    agree = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip([v[3][0] for v in singles["ref"]],
                                                                 [v[3][0] for v in singles["test"]])])
    assert logits["top1_agreement"] == pytest.approx(agree)


def test_cli_finetunes_four_outputs_on_text_of_varying_length(sentences, tmp_path):
    teacher, student, text = sentences
    base = [student, "--teacher", teacher, "--data", text, "--tokenizer", TOKENIZER, "--steps", "10",
            "--batch-size", "8", "--lr", "1e-3", "--held-out", "0.25"]
    report = tmp_path / "all.json"
    res = CliRunner().invoke(finetune_app, [*base, "-o", str(tmp_path / "all.onnx"), "--report-json", str(report)])
    assert res.exit_code == 0, res.output
    assert "distilling outputs token_embeddings, sentence_embedding, normalized, logits" in res.output
    figures = json.loads(report.read_text())
    assert figures["steps"] == 10
    for when in ("before", "after"):
        assert set(figures[when]["per_output"]) == set(FLOAT_OUTPUTS)
        assert all(np.isfinite(v) for f in figures[when]["per_output"].values() for v in f.values())
    report = tmp_path / "one.json"
    res = CliRunner().invoke(finetune_app, [*base, "--outputs", "sentence_embedding", "-o", str(tmp_path / "one.onnx"),
                                            "--report-json", str(report)])
    assert res.exit_code == 0, res.output
    assert "distilling output sentence_embedding\n" in res.output
    one = json.loads(report.read_text())
    assert "per_output" not in one["after"] and np.isfinite(one["after"]["sqnr_db"])
    # the one output's held-out figures are those of the all-outputs run's (same split, same student)
    assert one["before"]["sqnr_db"] == pytest.approx(figures["before"]["per_output"]["sentence_embedding"]["sqnr_db"])
    # the convert command's finetuning takes --outputs too
    res = CliRunner().invoke(convert_app, [teacher, "-o", str(tmp_path / "one_go.onnx"), "--weight-bits", "3",
                                           "--data", text, "--tokenizer", TOKENIZER, "--finetune-steps", "3",
                                           "--outputs", "sentence_embedding,logits"])
    assert res.exit_code == 0, res.output
    assert "distilling outputs sentence_embedding, logits" in res.output and "finetuned 3 steps" in res.output


def test_unknown_or_integer_output_is_a_one_line_error(sentences, tmp_path):
    teacher, student, text = sentences
    for flag_value, message in [("pooled", "--outputs: the model has no output 'pooled' (its outputs: "
                                           "token_embeddings, sentence_embedding, normalized, logits, n_tokens)"),
                                ("n_tokens", "--outputs: output 'n_tokens' is not a float tensor")]:
        res = CliRunner().invoke(finetune_app, [student, "--teacher", teacher, "--data", text, "--tokenizer", TOKENIZER,
                                                "--outputs", flag_value, "-o", str(tmp_path / "x.onnx")])
        assert res.exit_code == 1 and message in res.output, res.output
        assert res.output.count("\n") == 1 and res.output.startswith("mfconvert finetune: error:")
    res = CliRunner().invoke(convert_app, [teacher, "-o", str(tmp_path / "y.onnx"), "--data", text, "--tokenizer",
                                           TOKENIZER, "--finetune-steps", "2", "--outputs", "pooled"])
    assert res.exit_code == 1 and "mfconvert: error: --outputs: the model has no output 'pooled'" in res.output
    assert res.output.count("\n") == 1 and not (tmp_path / "y.onnx").exists()
    res = CliRunner().invoke(convert_app, [teacher, "--dry-run", "--outputs", "logits"])
    assert res.exit_code == 1 and "--outputs is for --finetune-steps" in res.output


def test_batch_one_model_trains_at_batch_8_like_its_dynamic_twin(batch_one):
    """Run example by example, the batch-1 model's steps are the full batch's: the same losses
    as its dynamic-batch twin (which ORT and the executor run as one batch of 8)."""
    paths, examples, _ = batch_one
    assert model_fixed_batch(onnx.load(paths["teacher"])) == 1
    assert model_fixed_batch(onnx.load(paths["twin"])) is None
    train, held = examples.split(0.2)
    cfg = dict(steps=30, batch_size=8, lr=3e-3, rounding="nearest", progress=False)
    fixed = finetune(onnx.load(paths["student"]), onnx.load(paths["teacher"]), train, FinetuneConfig(**cfg),
                     validation=held)
    twin = finetune(onnx.load(paths["twin_student"]), onnx.load(paths["twin"]), train, FinetuneConfig(**cfg),
                    validation=held)
    assert np.mean(fixed.losses[-5:]) < 0.7 * np.mean(fixed.losses[:5])
    # float32 sums in another order: ~1e-6 relative per step, grown over 30 steps of Adam
    np.testing.assert_allclose(fixed.losses, twin.losses, rtol=1e-3)
    for name in ("given", "trained"):
        assert fixed.validation_fidelity[name]["sqnr_db"] == pytest.approx(twin.validation_fidelity[name]["sqnr_db"],
                                                                            abs=0.05)
    assert fixed.validation_fidelity["trained"]["sqnr_db"] > fixed.validation_fidelity["given"]["sqnr_db"]
    # the written model keeps the [1, 16] interface
    assert [d.dim_value for d in fixed.model.graph.input[0].type.tensor_type.shape.dim] == [1, 16]


def test_data_calibration_of_a_batch_one_model(batch_one, tmp_path):
    """`mfconvert MODEL --data` (compensated rounding, activation statistics, --max-drop) on the
    batch-1 model: the codes written are the dynamic twin's (rounded on the same batches)."""
    paths, examples, data = batch_one
    def codes(path):
        model = onnx.load(path)
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return [inits[n.input[1]] for n in model.graph.node if n.op_type == "ShiftLinear"]

    outs = {}
    for key in ("teacher", "twin"):
        outs[key] = str(tmp_path / f"{key}.mf.onnx")
        res = CliRunner().invoke(convert_app, [paths[key], "-o", outs[key], "--weight-bits", "3", "--min-params",
                                               "512", "--data", data, "--act-bits", "16"])
        assert res.exit_code == 0, res.output
        assert "re-rounded by error-compensated rounding on 120 examples" in res.output
    got, want = codes(outs["teacher"]), codes(outs["twin"])
    assert got and all(a.shape == b.shape for a, b in zip(got, want))
    same = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(got, want)]))
    assert same > 0.99   # H summed per example vs per batch: a rare tie may round the other way
    res = CliRunner().invoke(convert_app, [paths["teacher"], "-o", str(tmp_path / "budget.onnx"), "--weight-bits",
                                           "3", "--min-params", "512", "--data", data, "--max-drop", "0.5"])
    assert res.exit_code == 0 and "--max-drop: measured drop" in res.output, res.output
    y = session(outs["teacher"]).run(None, {"x": examples.items[0]["x"][None]})[0]
    assert y.shape == (1, 32) and np.isfinite(y).all()
