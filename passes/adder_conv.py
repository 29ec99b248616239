"""Passes `adder-conv` (AdderNet) and `shift-add-conv` (ShiftAddNet): convolutions become AdderConv
ops (y = −Σ|x − w|, docs/ops.md#adderconv), each followed by a BatchNormalization the pass inserts,
or a ShiftConv followed by a 1×1 AdderConv and that BatchNormalization.

Both run before `shift-conv`, so the convs they leave (the first one by default, skips) can still
become ShiftConv. The conv is matched as shift-conv matches it (passes/conv.py: a BatchNormalization
reading it alone, a bias Add and a zero Pad before it are folded in, auto_pad resolved); the
inserted BatchNormalization's output is the old conv's (or folded BN's) output.

adder-conv. An adder output is a large negative distance, nothing like the conv's output, so
its weights start as w_a = c + α_m·w (w the conv's weights, per output channel m a scale α_m with
α_m·mean|w_m| = 2σ): most |w_a − c| then exceed the inputs' spread σ around c, where −|x − w_a|
is ±(x − c) + const, and the adder starts as the conv with its weights' signs (a binarised conv)
up to an affine map per channel, which the BatchNormalization's statistics undo: mean and variance
of the adder's output are mapped to those of the conv's. Data-free (this pass) c = 0 and the inputs
are taken as independent N(0, input_std²) (default σ = 1): the adder's statistics then follow from
the folded normal distribution, the conv's are b and σ²·‖w_m‖². With --data,
calibrate_adders() measures c and σ per input channel and both outputs' statistics on the data
and sets the weights and the BatchNormalization from them. Training (mfconvert finetune) then
moves the adder weights with AdderNet's gradients and adaptive learning rate (nn/adder_conv.py).

shift-add-conv. ShiftAddNet (You et al., NeurIPS 2020) follows each shift conv with an adder
conv with as many output channels: 1×1 in its CNN and ResNet downsample paths, the conv's kernel
in its ResNet bodies. We use 1×1, which admits an exact start: with adder weights w_mc = −L_c·a_mc
(a_mc = ±1 and L_c above every |s_c|), −Σ_c|s_c − w_mc| = −(A s)_m − Σ_c L_c, linear in the shift
conv's output s. So the shift conv gets the weights A⁻¹W (and bias A⁻¹b), the adder undoes A,
and the BatchNormalization (scale −1, mean −Σ L_c) the sign and offset: before training the pair
computes the shift conv of W (its power-of-two rounding error passed through A, which is why A is
a ±1 matrix of least condition number: Sylvester's Hadamard matrix for M a power of two, 1 then;
for a grouped conv A is block diagonal, one block per group, and the adder takes the conv's group).
L_c = a power of two ≥ 8·input_std·‖A⁻¹W_c‖₂ + |b'_c| data-free (≥ 1.25·max|s_c| with --data).
Finetuning moves the adder weights into their nonlinear range; --freeze-shift keeps the shift
layers' weights as converted (ShiftAddNet's fixed-shift variant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from mfconvert.nn import pow2
from mfconvert.nn.adder_conv import MAX_TAPS
from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.graph import claim, claimant, node_label
from mfconvert.passes.registry import PassError, register
from mfconvert.passes.report import PassResult
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.passes.targeting import Targeting, exclusion_reason

ADDER, SHIFT_ADD = "adder-conv", "shift-add-conv"
OP = "AdderConv"
BN_EPSILON = 1e-5
SCALE_SIGMAS = 2.0       # α_m·mean|w_m| = SCALE_SIGMAS·σ
RANGE_SIGMAS = 8.0       # shift-add, data-free: L_c ≥ RANGE_SIGMAS·σ·‖row‖₂


@dataclass
class _Selection(Targeting):
    min_params: int = 0
    # AdderNet and ShiftAddNet keep the first conv (the stem, on raw pixels) as it is: it stays
    # for shift-conv unless this is true.
    first: bool = False
    # Data-free starting point: the inputs of every conv taken as N(0, input_std²) (module docstring).
    input_std: float = 1.0

    def _check(self):
        self.check_targeting()
        if not (self.input_std > 0 and math.isfinite(self.input_std)):
            raise ValueError(f"input_std must be a positive number, got {self.input_std}")


@dataclass
class AdderConvConfig(_Selection):
    """AdderConv's activation format (act_bits, act_frac_bits: Q(A−F).F, as ShiftLinear's) and which
    convs to convert."""
    act_bits: int = 32
    act_frac_bits: int = 16

    def __post_init__(self):
        pow2.check_format(5, self.act_bits, self.act_frac_bits)
        self._check()


@dataclass
class ShiftAddConvConfig(ShiftFormat, _Selection):
    """The shift conv's format (ShiftFormat; the adder shares act_bits/act_frac_bits) and which
    convs to convert."""

    def __post_init__(self):
        super().__post_init__()
        self._check()


# -- shared -------------------------------------------------------------------------------------
def _candidates(graph: gs.Graph, result: PassResult, cfg) -> list:
    """(node, label, match) of each conv to convert; the others skipped with their reason."""
    from mfconvert.passes.conv import match_conv, shift_scale_reason   # here: importing passes.conv registers shift-conv

    convs = [n for n in graph.nodes if (n.domain or "") in ("", "ai.onnx") and claimant(graph, n) is None
             and n.op in ("Conv", "ConvInteger", "QLinearConv")]
    first = next((n for n in graph.nodes if n.op in ("Conv", "ConvInteger", "QLinearConv")), None)
    out = []
    for node in convs:
        label = node_label(node)
        if node.op != "Conv":
            result.skip(label, f"{node.op} convolves integer activations; {OP} takes and gives float32")
            continue
        reason = exclusion_reason(label, cfg.include, cfg.exclude) or shift_scale_reason(node)
        if reason:
            result.skip(label, reason)
            continue
        if node is first and not cfg.first:
            result.skip(label, "the first conv stays (AdderNet and ShiftAddNet keep the stem; shift-conv may take "
                               "it; first=true converts it)")
            continue
        match = match_conv(graph, node)
        if isinstance(match, str):
            result.skip(label, match.replace("ShiftConv", OP))
            continue
        if match.weight.size < cfg.min_params:
            result.skip(label, f"tiny conv: {match.weight.size} weights < min_params={cfg.min_params}")
            continue
        if not np.isfinite(match.weight).all() or (match.bias is not None and not np.isfinite(match.bias).all()):
            raise PassError(f"node '{label}': weight or bias has NaN or Inf values")
        out.append((node, label, match))
    return out


def _fixed_limit(cfg) -> float:
    """The largest |value| the Q(A−F).F format holds."""
    return (2.0 ** (cfg.act_bits - 1) - 1) * 2.0 ** -cfg.act_frac_bits


def adder_node(name: str, x: gs.Tensor, y: gs.Tensor, weight: np.ndarray, cfg, *, pads, strides, dilations,
               group: int) -> gs.Node:
    """An AdderConv node y = −Σ|x − weight| (no bias: the BatchNormalization after it has one)."""
    return gs.Node(op=OP, name=name, domain=DOMAIN, inputs=[x, gs.Constant(f"{name}.weight", weight.astype(np.float32))],
                   outputs=[y], attrs={"out_channels": int(weight.shape[0]), "kernel_shape": list(weight.shape[2:]),
                                       "strides": list(strides), "pads": list(pads), "dilations": list(dilations),
                                       "group": int(group), "act_bits": cfg.act_bits, "act_frac_bits": cfg.act_frac_bits})


def batchnorm_node(name: str, x: gs.Tensor, y: gs.Tensor, scale, bias, mean, var) -> gs.Node:
    """y = (x − mean)/√(var + ε)·scale + bias per channel (axis 1), ε = BN_EPSILON."""
    consts = [gs.Constant(f"{name}.{k}", np.asarray(v, np.float32).reshape(-1))
              for k, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))]
    return gs.Node(op="BatchNormalization", name=name, inputs=[x, *consts], outputs=[y],
                   attrs={"epsilon": BN_EPSILON})


def folded_normal_stats(w: np.ndarray, c: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of −Σ_j |x_j − w_j| per row of w [M, n] for independent x_j ~ N(c_j, σ_j²)
    (c, σ broadcast against w): E|z| = σ√(2/π)·e^(−μ²/2σ²) + μ·erf(μ/σ√2), Var|z| = μ² + σ² − E|z|²,
    with z = x − w ~ N(μ = c − w, σ²)."""
    from scipy.special import erf   # noqa: PLC0415  (scipy comes with scikit-learn, a dev dependency)

    mu = np.broadcast_to(c, w.shape) - w
    s = np.broadcast_to(sigma, w.shape)
    mean_abs = s * math.sqrt(2 / math.pi) * np.exp(-mu ** 2 / (2 * s ** 2)) + mu * erf(mu / (s * math.sqrt(2)))
    var_abs = np.maximum(mu ** 2 + s ** 2 - mean_abs ** 2, 0.0)
    return -mean_abs.sum(1), var_abs.sum(1)


def adder_start(weight: np.ndarray, center: np.ndarray, sigma: float, limit: float) -> np.ndarray:
    """w_a = c + α_m·w with α_m·mean|w_m| = SCALE_SIGMAS·σ (module docstring); c [M, C/g] the
    centre of each weight's input channel, σ the inputs' spread, clipped to the fixed-point range."""
    m = weight.shape[0]
    spatial = [1] * (weight.ndim - 2)
    mean_abs = np.abs(weight.reshape(m, -1)).mean(1)
    alpha = np.where(mean_abs > 0, SCALE_SIGMAS * sigma / np.maximum(mean_abs, 1e-30), 1.0)
    w_a = center.reshape(m, -1, *spatial) + alpha.reshape(-1, 1, *spatial) * weight
    return np.clip(w_a, -limit, limit)


def _input_stats(match, cfg, stats: dict | None):
    """Per input channel (c, σ) of the conv's input: measured (`stats`), else (0, input_std)."""
    channels = match.in_channels
    if stats is not None:
        return np.asarray(stats["mean"], np.float64), np.maximum(np.asarray(stats["std"], np.float64), 1e-12)
    return np.zeros(channels), np.full(channels, float(cfg.input_std))


def _group_rows(values: np.ndarray, match) -> np.ndarray:
    """Per input channel values [C] → per output channel's own group [M, C/g]."""
    m, cg = match.weight.shape[0], match.weight.shape[1]
    per_group = values.reshape(match.group, cg)
    return np.repeat(per_group, m // match.group, axis=0)


def adder_init(match, cfg, stats: dict | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(adder weights, BatchNormalization [scale, bias, mean, var]) for a matched conv: data-free
    from input N(0, input_std²), or from measured input statistics and, when `stats` has them,
    both outputs' measured mean and variance (keys out_mean/out_var, adder_mean/adder_var)."""
    w = np.asarray(match.weight, np.float64)
    m = w.shape[0]
    taps = int(np.prod(w.shape[2:]))
    center, sigma = _input_stats(match, cfg, stats)
    rows_c, rows_s = _group_rows(center, match), _group_rows(sigma, match)        # [M, C/g]
    w_a = adder_start(w, rows_c, float(np.mean(sigma)), _fixed_limit(cfg))
    if stats is not None and "adder_mean" in stats:
        a_mean, a_var = np.asarray(stats["adder_mean"]), np.asarray(stats["adder_var"])
        o_mean, o_var = np.asarray(stats["out_mean"]), np.asarray(stats["out_var"])
        sign = np.sign(np.asarray(stats.get("corr", np.ones(m))))
    else:
        flat_c = np.repeat(rows_c, taps, axis=1)
        flat_s = np.repeat(rows_s, taps, axis=1)
        a_mean, a_var = folded_normal_stats(w_a.reshape(m, -1), flat_c, flat_s)
        b = match.bias if match.bias is not None else np.zeros(m)
        o_mean = b + (w.reshape(m, -1) * flat_c).sum(1)
        o_var = ((w.reshape(m, -1) * flat_s) ** 2).sum(1)
        sign = np.ones(m)
    sign = np.where(sign == 0, 1.0, sign)
    scale = sign * np.sqrt(np.maximum(o_var, 0.0) + BN_EPSILON)
    var = np.maximum(a_var, BN_EPSILON)
    return w_a.astype(np.float32), [scale, o_mean, a_mean, var - BN_EPSILON]


def _conv_detail(match) -> str:
    shape = "×".join(map(str, match.kernel_shape))
    m = match.weight.shape[0]
    kind = "depthwise " if match.group == match.in_channels == m and match.group > 1 else \
        (f"group {match.group}, " if match.group > 1 else "")
    return (f"{kind}{shape} conv, stride {'×'.join(map(str, match.strides))}"
            + "".join(f" + {f}" for f in match.folded if f != "Pad") + (", Pad absorbed" if "Pad" in match.folded else ""))


def _change(pass_name: str, label: str, new_op: str, match, bytes_after: int, detail: str):
    from mfconvert.passes.conv import ConvChange, _last_dim

    m = match.weight.shape[0]
    k = match.weight.size // m
    before = m * k * match.weight_itemsize + (0 if match.bias is None else m * 4)
    return ConvChange(pass_name, label, new_op, k, m, before, bytes_after, activation=match.output.name,
                      last=_last_dim(match.output), detail=detail
                      + (f"; weights dequantised from {match.dequantised}" if match.dequantised else ""))


# -- adder-conv ---------------------------------------------------------------------------------
@register(ADDER, AdderConvConfig, "Conv with constant weights → AdderConv (y = −Σ|x − w|) + BatchNormalization")
def run_adder(graph: gs.Graph, cfg: AdderConvConfig) -> PassResult:
    result = PassResult(ADDER)
    for node, label, match in _candidates(graph, result, cfg):
        taps = match.weight.size // match.weight.shape[0]
        if taps > MAX_TAPS:
            result.skip(label, f"{taps} taps·channels per output exceed AdderConv's {MAX_TAPS}")
            continue
        weight, bn = adder_init(match, cfg)
        distances = gs.Variable(f"{label}.distances", dtype=np.float32)
        new = adder_node(label, match.activation, distances, weight, cfg, pads=match.pads, strides=match.strides,
                         dilations=match.dilations, group=match.group)
        norm = batchnorm_node(f"{label}.bn", distances, match.output, *bn)
        for old in match.nodes:
            old.outputs.clear()
        graph.nodes.extend([new, norm])
        claim(graph, [new, norm], ADDER)
        m = weight.shape[0]
        result.changes.append(_change(ADDER, label, OP, match, weight.size * 4 + 4 * m * 4,
                                      f"{_conv_detail(match)} → AdderConv + BatchNormalization (data-free start: "
                                      f"inputs ~ N(0, {cfg.input_std:g}²))"))
    graph.cleanup().toposort()
    return result


# -- shift-add-conv -----------------------------------------------------------------------------
def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def sign_matrix(m: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """A ±1 matrix [m, m] of least 2-norm condition number among: Sylvester's Hadamard matrix
    (m a power of two: condition 1), J − 2I, the leading m×m block of the next Hadamard matrix and
    8 random sign matrices; and its condition number."""
    if m & (m - 1) == 0:
        return sylvester(m), 1.0
    options = [np.ones((m, m)) - 2 * np.eye(m), sylvester(1 << m.bit_length())[:m, :m]]
    rng = np.random.default_rng(seed)
    options += [rng.choice([-1.0, 1.0], size=(m, m)) for _ in range(8)]
    conds = [np.linalg.cond(a) for a in options]
    best = int(np.argmin(conds))
    return options[best], float(conds[best])


def shift_add_init(match, cfg, stats: dict | None = None):
    """(shift weight A⁻¹W, shift bias A⁻¹b or None, adder weight [M, M, 1...], BatchNormalization
    [scale, bias, mean, var], condition of A) — the exact start of the module docstring. `stats`
    may give max_abs [M] of the shift conv's outputs on data."""
    w = np.asarray(match.weight, np.float64)
    m, g = w.shape[0], match.group
    # Grouped convs: output channel m reads only its group's inputs, so A mixes within a group
    # (block diagonal; the 1×1 adder takes the conv's group).
    block, cond = sign_matrix(m // g)
    a = np.kron(np.eye(g), block)
    a_inv = np.kron(np.eye(g), np.linalg.inv(block))
    w_shift = (a_inv @ w.reshape(m, -1)).reshape(w.shape)
    b_shift = a_inv @ match.bias if match.bias is not None else None
    if stats is not None and "max_abs" in stats:
        reach = 1.25 * np.asarray(stats["max_abs"], np.float64)
    else:
        reach = RANGE_SIGMAS * cfg.input_std * np.linalg.norm(w_shift.reshape(m, -1), axis=1) \
            + (np.abs(b_shift) if b_shift is not None else 0.0)
    limit = _fixed_limit(cfg)
    big = np.exp2(np.ceil(np.log2(np.maximum(reach, 2.0 ** -8))))
    big = np.minimum(big, 2.0 ** math.floor(math.log2(limit)))          # L_c, a power of two in range
    adder_w = np.concatenate([(-big.reshape(1, -1) * a)[i * (m // g):(i + 1) * (m // g), i * (m // g):(i + 1) * (m // g)]
                              for i in range(g)]).reshape(m, m // g, *[1] * (w.ndim - 2))
    bn = [-np.ones(m), np.zeros(m), np.repeat(-big.reshape(g, -1).sum(1), m // g), np.full(m, 1.0 - BN_EPSILON)]
    return w_shift, b_shift, adder_w.astype(np.float32), bn, cond


@register(SHIFT_ADD, ShiftAddConvConfig,
          "Conv → ShiftConv + 1×1 AdderConv + BatchNormalization (ShiftAddNet), starting as the shift conv")
def run_shift_add(graph: gs.Graph, cfg: ShiftAddConvConfig) -> PassResult:
    from mfconvert.passes.conv import shift_conv_node

    result = PassResult(SHIFT_ADD)
    for node, label, match in _candidates(graph, result, cfg):
        m = match.weight.shape[0]
        if m > MAX_TAPS:
            result.skip(label, f"{m} channels exceed the 1×1 AdderConv's {MAX_TAPS} taps")
            continue
        w_shift, b_shift, adder_w, bn, cond = shift_add_init(match, cfg)
        shifted = gs.Variable(f"{label}.shift", dtype=np.float32)
        distances = gs.Variable(f"{label}.distances", dtype=np.float32)
        output = match.output
        shift, nbytes = shift_conv_node(f"{label}.shift", replace(match, weight=w_shift, bias=b_shift, output=shifted),
                                        replace(cfg.shift_format, terms=cfg.terms_for(f"{label}.shift")))
        spatial = len(match.kernel_shape)
        adder = adder_node(f"{label}.adder", shifted, distances, adder_w, cfg, pads=[0] * (2 * spatial),
                           strides=[1] * spatial, dilations=[1] * spatial, group=match.group)
        norm = batchnorm_node(f"{label}.bn", distances, output, *bn)
        for old in match.nodes:
            old.outputs.clear()
        graph.nodes.extend([shift, adder, norm])
        claim(graph, [shift, adder, norm], SHIFT_ADD)
        result.changes.append(_change(SHIFT_ADD, label, "ShiftConv+AdderConv", match, nbytes + adder_w.size * 4 + 4 * m * 4,
                                      f"{_conv_detail(match)} → ShiftConv + 1×1 AdderConv {m}→{m}"
                                      + (f" (group {match.group})" if match.group > 1 else "") + " + BatchNormalization, "
                                      f"{cfg.weight_bits}-bit codes, ±1 mixing of condition {cond:.3g}"))
    graph.cleanup().toposort()
    return result


# -- with --data ---------------------------------------------------------------------------------
CANDIDATE_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _teacher_values(teacher, examples, tensors: list[str], count: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The teacher's values of `tensors` on the first `count` examples, in ORT."""
    import onnx

    from mfconvert.calibrate.activation_stats import _run
    from mfconvert.calibrate.data import Examples, model_fixed_batch
    from mfconvert.runtime import session

    augmented = onnx.ModelProto.FromString(teacher.SerializeToString())
    outputs = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in outputs)
    sess = session(augmented.SerializeToString())
    seen: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for batch in Examples(examples.items[:count], examples.pad_values).batches(batch_size):
        for name, value in _run(sess, tensors, batch, model_fixed_batch(teacher)):
            seen[name].append(np.asarray(value, np.float64))
    return {t: np.concatenate(v) for t, v in seen.items()}


def _channel_stats(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, *range(2, v.ndim))
    return v.mean(axes), v.var(axes)


def calibrate_adders(student, teacher, examples, count: int = 256) -> tuple[object, list[str]]:
    """Re-start the adder layers the passes made from data (--data), in a copy of `student`:
    each adder-conv layer's weights w_a = c + α_m·w (c, σ measured per input channel, α_m·mean|w_m|
    = A·σ with A among CANDIDATE_SIGMAS the one whose output correlates best with the conv's) and its
    BatchNormalization mapping the adder output's measured mean/variance to the conv's (keeping the
    sign of the correlation); each shift-add pair's L_c from the largest |s_c| seen. The conv's
    inputs and outputs come from the teacher on the first `count` examples. Returns (model, one
    line per layer)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from mfconvert.nn.adder_conv import from_onnx
    from mfconvert.nn.onnx_ops import attributes

    model = onnx.ModelProto.FromString(student.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    teacher_names = {o for n in teacher.graph.node for o in n.output} | {i.name for i in teacher.graph.input}
    jobs = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "BatchNormalization":
            continue
        bn = after[0]
        shift = produced_by.get(node.input[0])
        pair = shift is not None and shift.domain == DOMAIN and shift.op_type == "ShiftConv"
        source = shift.input[0] if pair else node.input[0]
        if source in teacher_names and bn.output[0] in teacher_names:
            jobs.append((node, bn, pair, source))
    if not jobs:
        return model, []
    values = _teacher_values(teacher, examples, sorted({t for _, bn, _, s in jobs for t in (s, bn.output[0])}), count)
    lines = []

    def write(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32).reshape(
            numpy_helper.to_array(inits[name]).shape), name))

    for node, bn, pair, source in jobs:
        y = values[bn.output[0]]
        attrs = attributes(node)
        w_a = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        m = w_a.shape[0]
        if pair:
            # s = A⁻¹·(conv output), the shift conv's output before its rounding (module docstring)
            group = int(attrs.get("group", 1))
            blocks = -np.sign(w_a.reshape(group, m // group, m // group))
            a_inv = np.zeros((m, m))
            for i, b in enumerate(blocks):
                a_inv[i * (m // group):(i + 1) * (m // group), i * (m // group):(i + 1) * (m // group)] = np.linalg.inv(b)
            s = np.einsum("mc,nc...->nm...", a_inv, y)
            big = np.exp2(np.ceil(np.log2(np.maximum(1.25 * np.abs(s).max(axis=(0, *range(2, s.ndim))), 2.0 ** -8))))
            limit = (2.0 ** (attrs.get("act_bits", 32) - 1) - 1) * 2.0 ** -attrs.get("act_frac_bits", 16)
            big = np.minimum(big, 2.0 ** math.floor(math.log2(limit)))
            write(node.input[1], -big.reshape(group, 1, -1) * blocks)
            write(bn.input[3], np.repeat(-big.reshape(group, -1).sum(1), m // group))
            lines.append(f"{node.name}: 1×1 adder range L_c from max |s_c| on {len(y)} examples "
                         f"(L = 2^{int(np.log2(big.min()))}…2^{int(np.log2(big.max()))})")
            continue
        x = values[source]
        group = int(attrs.get("group", 1))
        center, var = _channel_stats(x)
        sigma = np.sqrt(np.maximum(var, 1e-12))
        cg = w_a.shape[1]
        rows_c = np.repeat(center.reshape(group, cg), m // group, axis=0)
        direction = w_a / np.maximum(np.abs(w_a.reshape(m, -1)).mean(1), 1e-30).reshape(-1, *[1] * (w_a.ndim - 1))
        limit = (2.0 ** (attrs.get("act_bits", 32) - 1) - 1) * 2.0 ** -attrs.get("act_frac_bits", 16)
        o_mean, o_var = _channel_stats(y)
        best = None
        xt = torch.from_numpy(x[:32].astype(np.float32))
        for k in CANDIDATE_SIGMAS:
            cand = adder_start(direction, rows_c, k * float(sigma.mean()), limit)
            layer = from_onnx(node, attrs, {1: cand.astype(np.float32)}).train()   # float forward: faster, as close
            with torch.no_grad():
                out = layer(xt).double().numpy()
            yo = y[:32]
            axes = (0, *range(2, out.ndim))
            a_c, y_c = out - out.mean(axes, keepdims=True), yo - yo.mean(axes, keepdims=True)
            corr = (a_c * y_c).sum(axes) / np.sqrt((a_c ** 2).sum(axes) * (y_c ** 2).sum(axes) + 1e-30)
            if best is None or np.abs(corr).mean() > best[0]:
                best = (float(np.abs(corr).mean()), k, cand, corr)
        score, k, cand, corr = best
        layer = from_onnx(node, attrs, {1: cand.astype(np.float32)}).train()
        with torch.no_grad():
            out = np.concatenate([layer(torch.from_numpy(x[i:i + 64].astype(np.float32))).double().numpy()
                                  for i in range(0, len(x), 64)])
        a_mean, a_var = _channel_stats(out)
        sign = np.where(corr < 0, -1.0, 1.0)
        write(node.input[1], cand)
        write(bn.input[1], sign * np.sqrt(o_var + BN_EPSILON))
        write(bn.input[2], o_mean)
        write(bn.input[3], a_mean)
        write(bn.input[4], np.maximum(a_var, BN_EPSILON) - BN_EPSILON)
        lines.append(f"{node.name}: adder start from {len(x)} examples, α·mean|w| = {k:g}σ, "
                     f"output correlation with the conv {score:.3f}")
    return model, lines
