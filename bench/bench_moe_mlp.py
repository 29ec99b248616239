"""Benchmark the ShiftMoEMLP block in ONNX Runtime at routing splits 0/50/80/100 % to Shift,
against the original dense fp32 MLP and the same MLP with both linears as ShiftLinear.

    .venv/bin/python bench/bench_moe_mlp.py [--threads 2] [--repeats 40] [--splits 0 0.5 0.8 1]

Each MLP is fc1 → GELU (erf form, as torch exports it) → fc2 with random weights (normal, std
0.05) and biases, input [1, tokens, d]. The MoE block is what `moe-mlp` makes of it; its router
is then set to route on the sign of feature 0, and the inputs carry +1 there for exactly the
tokens that should go to Shift. Runs are interleaved; each figure is the median of `repeats`
samples (and a second table of the fastest samples, which a shared machine disturbs least).
Every session has thread spinning off: three sessions each own a spinning 2-thread pool
on 2 cores, and with spinning on, the previous session's spinning threads starve the next one
(measured outliers of 10–20 ms on runs of 1 ms). The last columns give the per-token expert latencies (τ_mult, τ_shift) that
ShiftMoEMLP's balancing loss takes and the split they make its target.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort
import statistics

from bench_shift_linear import cpu_name, interleaved_samples, plain_session
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.passes.moe_mlp import ROUTES_KEY
from mfconvert.runtime import session

SHAPES = [(197, 192, 768), (128, 384, 1536)]
SPLITS = [0.0, 0.5, 0.8, 1.0]


def dense_mlp(rng, d, hidden):
    w = lambda *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32))  # noqa: E731
    inits = [w(d, hidden), w(hidden), w(hidden, d), w(d)]
    for name, tensor in zip(["w1", "b1", "w2", "b2"], inits):
        tensor.name = name
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              [("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5)]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["t0"]), helper.make_node("Erf", ["t0"], ["t1"]),
             helper.make_node("Add", ["t1", "one"], ["t2"]), helper.make_node("Mul", ["h", "t2"], ["t3"]),
             helper.make_node("Mul", ["t3", "half"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y0"], name="fc2"), helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def route_on_feature0(model):
    """Set each MoE block's router to logits (0, x_0): Shift exactly where feature 0 is > 0."""
    routes = set(json.loads({p.key: p.value for p in model.metadata_props}[ROUTES_KEY]).values())
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    for route in routes:
        router = producer[producer[route].input[0]]
        weight = numpy_helper.to_array(inits[router.input[1]]).copy()
        weight[:] = 0
        weight[1, 0] = 100.0                       # |logit difference| = 100: gate exactly 1
        inits[router.input[1]].CopyFrom(numpy_helper.from_array(weight, router.input[1]))
    return model


def no_spin_session(model, threads, custom_ops=True):
    if not custom_ops:
        return plain_session(model.SerializeToString(), threads)
    return session(model.SerializeToString(), threads=threads, spinning=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", type=float, nargs="+", default=SPLITS,
                    help="shares of tokens routed to Shift (0 is needed for the routing overhead)")
    args = ap.parse_args()
    splits = sorted(set(args.splits) | {0.0})
    rng = np.random.default_rng(args.seed)
    only = dict(add_attention=None)
    rows = []
    for tokens, d, hidden in SHAPES:
        dense = dense_mlp(rng, d, hidden)
        shift = convert_onnx(dense, ConvertConfig(shift_linear=ShiftLinearConfig(min_params=0), **only)).model
        moe = convert_onnx(dense, ConvertConfig(shift_linear=None, moe_mlp=MoEMLPConfig(router_std=0.0), **only))
        sessions = {"dense": no_spin_session(dense, args.threads, custom_ops=False),
                    "shift": no_spin_session(shift, args.threads),
                    "moe": no_spin_session(route_on_feature0(moe.model), args.threads)}
        x = rng.standard_normal((1, tokens, d)).astype(np.float32)
        runs = {"dense": lambda: sessions["dense"].run(None, {"x": x}),
                "shift": lambda: sessions["shift"].run(None, {"x": x})}
        for split in splits:
            xs = x.copy()
            xs[0, :, 0] = -1.0
            xs[0, rng.permutation(tokens)[:round(split * tokens)], 0] = 1.0
            runs[split] = lambda xs=xs: sessions["moe"].run(None, {"x": xs})
        rows.append(((tokens, d, hidden), interleaved_samples(runs, args.repeats)))

    for stat, label in ((statistics.median, "median"), (min, "fastest")):
        print(f"ShiftMoEMLP block vs dense fp32 MLP, ONNX Runtime {ort.__version__} on {cpu_name()}, "
              f"{args.threads} threads (no spinning), {label} of {args.repeats} interleaved samples\n")
        print("| tokens, d→h→d | dense µs | ShiftLinear MLP µs | "
              + " | ".join(f"MoE {round(s * 100)} % Shift µs (×dense)" for s in splits)
              + " | routing overhead µs | MoE 100 % vs ShiftLinear + overhead | τ_shift/τ_mult | balanced split |")
        print("|---|" + "---:|" * (5 + len(splits)))
        for (tokens, d, hidden), samples in rows:
            t = {k: stat(v) for k, v in samples.items()}
            overhead = t[0.0] - t["dense"]
            cells = " | ".join(f"{t[s] * 1e6:.0f} ({t[s] / t['dense']:.2f}×)" for s in splits)
            ratio = t["shift"] / t["dense"]
            full = f"{t[1.0] / (t['shift'] + overhead):.2f}×" if 1.0 in t else "—"
            print(f"| {tokens}, {d}→{hidden}→{d} | {t['dense'] * 1e6:.0f} | {t['shift'] * 1e6:.0f} | {cells} "
                  f"| {overhead * 1e6:.0f} | {full} | {ratio:.2f} | {100 / (1 + ratio):.0f} % Shift |")
        print()


if __name__ == "__main__":
    main()
