"""Each shift layer's share of the output error, measured through its fan-out (calibrate/allocate.py).

The original model runs in ONNX Runtime with every probed linear's weight input replaced by
`W + s_l·(Q_t(W) − W)`, the `s_l` read from one extra graph input (`SWITCH`, a float vector): all
zero it is the original; a one at slot l is the model with layer l alone rounded to t terms (the
converted layer's weights, float activations). One session, one run per slot on a few inputs:
no conversion per layer. Layer l's error is the output's ½·‖y − y′‖²/‖y‖² (sensitivity.nsr_drop,
the allocation's metric) when it alone is rounded, so whatever its fan-out does to its error
(attention softmaxes, LayerNorm, a classifier's read-out) is in the figure.

Inputs: the calibration data with `--data`; without, probe inputs synthesised from the model's
input signature (`probe_examples`): token ids uniform over the vocabulary of the embedding table
(or one-hot depth) they index, attention masks of ones, float inputs N(0, 1).

Probed: ShiftLinear nodes whose original is a MatMul/Gemm with a float32 weight. Others (shift
convolutions, the MoE's Shift experts) are not: allocate.py scales their weight NSR by what the
probed layers measured.
"""
from __future__ import annotations

import numpy as np
import onnx

from mfconvert.calibrate.data import Examples, run_chunked, session_fixed_batch
from mfconvert.calibrate.evaluate import model_float_outputs, output_names, split_examples

SWITCH = "mfconvert_probe_switch"
PROBE_EXAMPLES = 8          # synthesised probe inputs without data
DEFAULT_LENGTH = 64         # a dynamic non-batch dimension of a probe input (a sequence length)
PASS_THROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand")
# Heads over several classes: random inputs make them certain, which hides every error in their
# probabilities, while the logits' norm stays a fair scale. Not a one-value Sigmoid: its logit
# near 0 (p ≈ ½) makes any error look large against it (oww-alexa 10×, smart-turn 1000× over).
SATURATING = ("Softmax", "LogSoftmax", "Exp")
# between a saturating head and its logits: shifts (softmax's max), normalisers. Not a Q/DQ pair:
# the head reads the logits on its int8 grid, where an error below a step vanishes.
TRANSPARENT = ("Div", "Sub", "Reshape", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze")


def pre_activation(graph, output) -> object | None:
    """The float tensor an output's saturating head (Softmax, an unfused exp/sum) reads:
    its logits, past shifts (not past a Q/DQ pair); None when the output has no such head. (gs
    graph and tensor.)"""
    t, found, crossed = output, None, False
    for _ in range(8):
        node = t.inputs[0] if t.inputs else None
        if node is None or not node.inputs:
            break
        if node.op in SATURATING:
            crossed = True
        elif node.op not in TRANSPARENT:
            break
        t = node.inputs[0]
        if crossed and not _is_constant(t):
            found = t
    return found


def add_logit_outputs(graph, names: list[str]) -> dict[str, str]:
    """{output: its logits} for the outputs `names` of gs `graph` that have a saturating head
    (pre_activation), those logits added to the graph's outputs."""
    tensors = graph.tensors()
    logit_of = {}
    for name in names:
        before = pre_activation(graph, tensors[name]) if name in tensors else None
        if before is not None and before.name not in names:
            logit_of[name] = before.name
            if before not in graph.outputs:
                before.dtype = before.dtype or np.float32
                graph.outputs.append(before)
    return logit_of


def with_logits(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(`model` with the logits its outputs' saturating heads read as extra outputs, {output:
    its logits}: add_logit_outputs); the model itself when no output has such a head."""
    import onnx_graphsurgeon as gs
    graph = gs.import_onnx(model)
    logit_of = add_logit_outputs(graph, names)
    if not logit_of:
        return model, {}
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out, logit_of


def head_drop(reference: dict, test: dict, names: list[str], logit_of: dict[str, str]) -> float:
    """The outputs' ½·NSR (sensitivity.nsr_drop), averaged over `names`, each output's the larger
    of its own and its logits' where `logit_of` names them (and `test` has them)."""
    from mfconvert.calibrate.sensitivity import nsr_drop
    ref, got = getattr(reference, "rows", reference), getattr(test, "rows", test)
    return float(np.mean([max(nsr_drop({n: ref[n]}, got),
                              nsr_drop({logit_of[n]: ref[logit_of[n]]}, got)
                              if n in logit_of and logit_of[n] in got else 0.0) for n in names]))


def _is_constant(tensor) -> bool:
    import onnx_graphsurgeon as gs
    return isinstance(tensor, gs.Constant)


def _int_range(model: onnx.ModelProto, name: str) -> int | None:
    """The number of distinct values an integer input indexes: the rows of the embedding table a
    Gather reads with it, a OneHot's depth, or the size of the constant range an Equal compares it
    with (a one-hot written out), through casts, reshapes and broadcasts; None if none."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def value(tensor):
        if tensor in inits:
            return onnx.numpy_helper.to_array(inits[tensor])
        if tensor in consts:
            return onnx.numpy_helper.to_array(consts[tensor].attribute[0].t)
        return None

    seen, todo = set(), [name]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for node in consumers.get(t, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == t and node.input[0] in inits:
                return int(inits[node.input[0]].dims[0])
            if node.op_type == "OneHot" and node.input[0] == t:
                depth = value(node.input[1])
                if depth is not None:
                    return int(np.asarray(depth).reshape(-1)[0])
            if node.op_type == "Equal":   # a one-hot written out: Equal(indices, iota)
                other = value(node.input[1] if node.input[0] == t else node.input[0])
                if other is not None and np.size(other) > 1:
                    return int(np.max(other)) + 1
            if node.op_type in PASS_THROUGH and node.input[0] == t:
                todo.append(node.output[0])
    return None


def probe_examples(model: onnx.ModelProto, n: int = PROBE_EXAMPLES, input_shapes: dict | None = None,
                   seed: int = 0) -> Examples:
    """`n` inputs of the kind the model's signature asks for (module docstring), without their
    batch axis; `input_shapes` (as convert_onnx takes them) fixes dynamic dimensions."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        dims = list((input_shapes or {}).get(inp.name) or
                    [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim])
        if not dims:
            raise ValueError(f"input {inp.name!r} is a scalar: no probe input can be synthesised for it")
        shape = [d if isinstance(d, int) and d > 0 else DEFAULT_LENGTH for d in dims[1:]]
        specs.append((inp.name, dtype, shape, _int_range(model, inp.name) if np.issubdtype(dtype, np.integer) else None))
    items = []
    for _ in range(n):
        item = {}
        for name, dtype, shape, high in specs:
            if np.issubdtype(dtype, np.floating):
                x = rng.normal(0.0, 1.0, size=shape)
            elif dtype == np.bool_ or "mask" in name.lower():
                x = np.ones(shape)
            elif high is not None:
                x = rng.integers(0, high, size=shape)
            else:   # token types, flags: the first value
                x = np.zeros(shape)
            item[name] = np.asarray(x).astype(dtype)
        items.append(item)
    return Examples(items, {})


class LayerProbe:
    """The original model with a switchable rounding error on each probed linear's weight
    (module docstring). `errors(examples)` gives {node: [drop at each of `terms`]}."""

    def __init__(self, original: onnx.ModelProto, nodes, terms=(1,), outputs: list[str] | None = None,
                 threads: int | None = None, logits: bool = False):
        """`logits`: an output behind a Softmax is also compared before it, and counts by the
        larger of the two errors (without data: synthesised inputs can drive a classifier to
        certainties no real input gives, where its probabilities hide every error)."""
        import onnx_graphsurgeon as gs
        import torch

        from mfconvert.nn import pow2
        from mfconvert.runtime import session
        self.terms = tuple(terms)
        graph = gs.import_onnx(original)
        by_name = {n.name: n for n in graph.nodes}
        switch = gs.Variable(SWITCH, dtype=np.float32, shape=[None])
        self.slots: dict[str, list[int]] = {}
        count = 0
        for item in nodes:
            node = by_name.get(item.node)
            if item.op != "ShiftLinear" or node is None or node.op not in ("MatMul", "Gemm"):
                continue
            w_in = node.inputs[1]
            if w_in.dtype not in (np.float32, None):
                continue
            e = torch.from_numpy(np.asarray(item.exponent, dtype=np.int32)).to(torch.int8)
            w = torch.from_numpy(np.asarray(item.weight, dtype=np.float32))
            parts = pow2.residual_terms(w, e, item.weight_bits, max(self.terms) + 1)
            if node.op == "Gemm":   # match_linear's [out, in] weight is alpha · (B or Bᵀ)
                layout = (lambda d, n=node: d / float(n.attrs.get("alpha", 1.0)) if n.attrs.get("transB", 0)
                          else d.T / float(n.attrs.get("alpha", 1.0)))
            else:
                layout = lambda d: d.T  # noqa: E731
            total = w_in
            slots = []
            for t in self.terms:
                delta = np.ascontiguousarray(layout(-parts[t].numpy())).astype(np.float32)   # Q_t(W) − W
                scale = gs.Variable(f"{SWITCH}/{item.node}/{t}/s", dtype=np.float32)
                graph.nodes.append(gs.Node("Gather", inputs=[switch, gs.Constant(f"{SWITCH}/{item.node}/{t}/i",
                                                                                  np.array(count, np.int64))],
                                           outputs=[scale]))
                scaled = gs.Variable(f"{SWITCH}/{item.node}/{t}/d", dtype=np.float32)
                graph.nodes.append(gs.Node("Mul", inputs=[scale, gs.Constant(f"{SWITCH}/{item.node}/{t}/D", delta)],
                                           outputs=[scaled]))
                summed = gs.Variable(f"{SWITCH}/{item.node}/{t}/w", dtype=np.float32)
                graph.nodes.append(gs.Node("Add", inputs=[total, scaled], outputs=[summed]))
                total = summed
                slots.append(count)
                count += 1
            node.inputs[1] = total
            self.slots[item.node] = slots
        self.size = count
        self.names = output_names(model_float_outputs(original), outputs)
        self.logit_of: dict[str, str] = add_logit_outputs(graph, self.names) if logits else {}
        graph.inputs.append(switch)
        graph.toposort()
        model = gs.export_onnx(graph)
        model.ir_version = original.ir_version
        self.session = session(model.SerializeToString(), threads=threads)
        self.fetch = list(dict.fromkeys(self.names + list(self.logit_of.values())))
        self.declared = {a.name: [d if isinstance(d, (int, str)) and d not in (0, "") else None for d in a.shape]
                         for a in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        self.limit = session_fixed_batch(_Inputs(self.session))

    def outputs(self, examples: Examples, on: list[int] = (), batch_size: int = 64) -> dict[str, list[np.ndarray]]:
        """{output: one array per example} with the slots `on` switched on."""
        s = np.zeros(max(self.size, 1), np.float32)
        s[list(on)] = 1.0
        out: dict[str, list] = {n: [] for n in self.fetch}
        for batch in examples.batches(batch_size):
            values = run_chunked(lambda feeds: self.session.run(self.fetch, {**feeds, SWITCH: s}), batch, self.limit)
            for name, rows in split_examples(dict(zip(self.fetch, values)), batch, self.declared).items():
                out[name].extend(rows)
        return out

    def drop(self, reference: dict, test: dict) -> float:
        """The outputs' ½·NSR (sensitivity.nsr_drop), each output's the larger of its own and its
        logits' where compared before its head too."""
        return head_drop(reference, test, self.names, self.logit_of)

    def errors(self, examples: Examples, progress=None) -> dict[str, list[float]]:
        """{probed node: [the output's ½·NSR with it alone rounded to t terms, for t in terms]}."""
        reference = self.outputs(examples)
        result = {}
        for i, (node, slots) in enumerate(self.slots.items()):
            if progress:
                progress(f"probe {i + 1}/{len(self.slots)}: {node}")
            result[node] = [self.drop(reference, self.outputs(examples, [s])) for s in slots]
        return result

    def together(self, examples: Examples, t_index: int = 0) -> float:
        """The output's ½·NSR with every probed node rounded at once (terms[t_index])."""
        return self.drop(self.outputs(examples), self.outputs(examples, [s[t_index] for s in self.slots.values()]))


class _Inputs:
    """session_fixed_batch reads `get_inputs()`: the session's data inputs, the switch left out."""

    def __init__(self, sess):
        self.sess = sess

    def get_inputs(self):
        return [i for i in self.sess.get_inputs() if i.name != SWITCH]
