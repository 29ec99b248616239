"""The executor (nn.OnnxModule) on ONNX's own backend node tests: every applicable case (the same
filter as ../shared/tools/conformance.py: not training, sequence/optional, string, random, ML-domain,
Loop/Scan ops or 8/4-bit float and int4 cases), each output within rtol 1e-3 / atol 1e-4 (NaN =
NaN). The failing cases must be exactly those in conformance_expected.json, each with its reason (a
regression and an unexpected pass both fail), and the pass rate at least 95 %.

Unlike conformance.py, inputs and expected outputs stored as TensorProto (the 2-bit and blocked
quantization cases, Cast) are decoded and bfloat16 goes through torch's own dtype, so those cases
measure the executor, not the harness. Regenerate the file after a deliberate change with
`.venv/bin/python -m mfconvert.tests.test_conformance --write`."""
from __future__ import annotations

import json
import pathlib
import sys
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from mfconvert.nn.onnx_module import OnnxModule

EXPECTED = pathlib.Path(__file__).with_name("conformance_expected.json")
SKIP_OPS = {"Adagrad", "Adam", "Momentum", "Gradient", "Bernoulli", "RandomNormal", "RandomUniform",
            "RandomNormalLike", "RandomUniformLike", "Multinomial", "Loop", "Scan", "ImageDecoder",
            "RegexFullMatch", "TfIdfVectorizer", "LabelEncoder", "ArrayFeatureExtractor", "Binarizer",
            "TreeEnsemble", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "SoftmaxCrossEntropyLoss",
            "NegativeLogLikelihoodLoss"}
SKIP_WORDS = ("sequence", "optional", "string", "float8", "e4m3", "e5m2", "int4", "uint4", "float4", "e2m1",
              "training", "_seq", "identity_opt", "if_opt")


def applicable_cases():
    from onnx.backend.test.case import node as node_cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    for c in cases:
        if c.model is None or not c.data_sets:
            continue
        ops = [n.op_type for n in c.model.graph.node]
        op = ops[-1] if ops else "?"
        if c.model.graph.node and len(set(ops)) == 1:
            op = ops[0]
        if op in SKIP_OPS or any(w in c.name.lower() for w in SKIP_WORDS) or op.startswith(
                ("Sequence", "Optional", "String")):
            continue
        yield c


def _array(v) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype == object and v.shape == () and isinstance(v.item(), onnx.TensorProto):
        return numpy_helper.to_array(v.item())
    return v


def _tensor(v: np.ndarray) -> torch.Tensor:
    if v.dtype.name == "bfloat16":
        return torch.from_numpy(v.view(np.uint16).copy()).view(torch.bfloat16)
    if v.dtype.name in ("int2", "uint2"):
        raise TypeError(f"{v.dtype.name} has no torch dtype (2-bit types, left out like int4)")
    return torch.from_numpy(np.array(v, copy=True))


def _numpy(t) -> np.ndarray:
    if torch.is_tensor(t):
        t = t.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(t)


def run_case(c) -> str | None:
    """None when the case passes, else the reason (one line)."""
    try:
        m = OnnxModule(c.model)
    except Exception as e:   # noqa: BLE001 - the reason is the result
        note = " (random ops are left out)" if "Random" in str(e) else ""
        return f"build: {type(e).__name__}: {str(e)[:150]}{note}"
    for inputs, outputs in c.data_sets:
        try:
            feeds = {n: _tensor(_array(v)) for n, v in zip(m.input_names, inputs)}
            with torch.no_grad():
                got = m(**feeds)
        except Exception as e:   # noqa: BLE001
            return f"run: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        for name, g, e in zip(m.output_names, got, outputs):
            g, e = _numpy(g), _array(e)
            if e.dtype.name in ("int2", "uint2"):
                e = e.astype(np.int8)
            if g.shape != e.shape:
                return f"output '{name}': shape {list(g.shape)} != {list(e.shape)}"
            gf = g if g.dtype == bool else g.astype(np.float64)
            ef = e if e.dtype == bool else e.astype(np.float64)
            if not np.allclose(gf, ef, rtol=1e-3, atol=1e-4, equal_nan=True):
                err = np.nanmax(np.abs(gf.astype(np.float64) - ef.astype(np.float64))) if gf.size else 0
                note = " (bfloat16 rounding: its epsilon 2^-7 is coarser than rtol 1e-3)" \
                    if e.dtype.name == "bfloat16" else ""
                return f"output '{name}': max abs error {err:.3g}{note}"
    return None


def sweep() -> tuple[int, dict[str, str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add overhead
    total, failures = 0, {}
    try:
        for c in applicable_cases():
            total += 1
            reason = run_case(c)
            if reason is not None:
                failures[c.name] = reason
    finally:
        torch.set_num_threads(threads)
    return total, failures


def test_backend_node_conformance():
    total, failures = sweep()
    expected = json.loads(EXPECTED.read_text())["failures"]
    regressions = {k: v for k, v in failures.items() if k not in expected}
    fixed = sorted(set(expected) - set(failures))
    assert not regressions, f"cases that now fail: {regressions}"
    assert not fixed, f"cases that now pass (remove them from {EXPECTED.name}): {fixed}"
    rate = 1 - len(failures) / total
    assert rate >= 0.95, f"pass rate {rate:.3f} of {total} cases"


if __name__ == "__main__":
    total, failures = sweep()
    print(f"{total - len(failures)}/{total} pass ({1 - len(failures) / total:.3f})")
    if "--write" in sys.argv:
        EXPECTED.write_text(json.dumps({"cases": total, "passing": total - len(failures),
                                        "failures": dict(sorted(failures.items()))}, indent=1) + "\n")
    else:
        for k, v in sorted(failures.items()):
            print(f"  {k}: {v}")
