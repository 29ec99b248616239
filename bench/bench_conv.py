"""Benchmark the ShiftConv (1 and 2 terms) and AdderConv kernels against ONNX Runtime's fp32 Conv
and its static int8 quantisation (QDQ, per channel) of the same layer, on MobileNetV2 and
ResNet-50 layer shapes at batch 1.

    .venv/bin/python bench/bench_conv.py [--threads 1,2] [--repeats 30] [--only NAME] [--before LIB]
    .venv/bin/python bench/bench_conv.py --model mobilenetv2 [--threads 1,2] [--repeats 30]
        [--workdir out/bench_conv]

`--before LIB` adds a "shift1 before" column: the same ShiftConv model through another build of the
op library (each session registers its own copy; it exports only RegisterCustomOps, so two copies
coexist), for before/after ratios of interleaved runs.

`--cpu-time N` (with `--before LIB`): the kernel alone, single thread, before vs after vs fp32, one
and two terms: N interleaved single calls per session, each timed by the calling thread's CPU time
(`time.thread_time`, which a preemption on a shared machine does not inflate; ORT runs a 1-thread
session on the calling thread), the fastest kept; MAC/cycle at --ghz (the core's measured clock).

`--model mobilenetv2`: torchvision's ImageNet MobileNetV2 (zoo/public.py, torchscript export)
end to end at batch 1, the fp32 original against its data-free conversions with the CLI's default
passes (shift-conv on; `--shift-terms 1` and `auto`), converted once into --workdir; interleaved
samples as for the layers; "fp32/ours" is the ratio of medians, then of the fastest samples.

Each layer gets one single-node model per kind with the same random weights (normal, std 0.05;
ShiftConv's rounded by nn/pow2.py, 5-bit codes, Q16.16), run interleaved (warm-up, then
`repeats` samples, each the mean of enough runs to last >= 2 ms) with spinning off in every
session (intra- and inter-op); the table gives medians and "t_X / t_ours" (> 1: ours faster), the
ratio of medians and, in parentheses, of the fastest samples (on a shared machine a long call is
preempted more often than a short one, so the medians of slow kernels measure the scheduler).
MAC/cycle/thread = MACs / (fastest sample x nominal clock x threads) against the inner loop's
limit: ShiftConv's direct kernel is load + vpsravd + vpaddd per 16 (AVX-512) or 8 (AVX2) MACs —
two ALU µops, so 16 MAC/cycle on AVX-512's two vector ports (vpsravd runs on one of them: p0 on
Intel), 12 with AVX2's three; its lookup-table path (dense layers, AVX-512) one vpermt2d (port 5)
+ one vpaddd per 16 MACs plus ~4 µops of table per im2col input, 16 at most; AdderConv is vpsubd +
vpabsd + vpaddd: 10.7 and 8. fp32 FMA peaks at 32 (two AVX-512 FMA ports) and int8 VNNI at 128.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shift_linear import cpu_name, interleaved_samples  # noqa: E402

from mfconvert.nn import pow2  # noqa: E402
from mfconvert.ort_ops import DOMAIN, library_path  # noqa: E402

# name: (C, H, W, M, k, stride, group); pads k // 2 on every side (the networks' own).
LAYERS = {
    "MobileNetV2 stem 3x3 s2 3→32 @224": (3, 224, 224, 32, 3, 2, 1),
    "MobileNetV2 dw 3x3 32 @112": (32, 112, 112, 32, 3, 1, 32),
    "MobileNetV2 dw 3x3 s2 144 @56": (144, 56, 56, 144, 3, 2, 144),
    "MobileNetV2 dw 3x3 576 @14": (576, 14, 14, 576, 3, 1, 576),
    "MobileNetV2 pw 24→144 @56": (24, 56, 56, 144, 1, 1, 1),
    "MobileNetV2 pw 576→96 @14": (576, 14, 14, 96, 1, 1, 1),
    "ResNet-50 3x3 64→64 @56": (64, 56, 56, 64, 3, 1, 1),
    "ResNet-50 3x3 s2 128→128 @56": (128, 56, 56, 128, 3, 2, 1),
    "ResNet-50 3x3 256→256 @14": (256, 14, 14, 256, 3, 1, 1),
    "ResNet-50 pw 256→64 @56": (256, 56, 56, 64, 1, 1, 1),
    "ResNet-50 pw 1024→256 @14": (1024, 14, 14, 256, 1, 1, 1),
}
KINDS = ["shift1", "shift2", "adder", "fp32", "int8"]
LIMIT = {"avx512": {"shift": 16.0, "adder": 16.0 * 2 / 3}, "avx2": {"shift": 12.0, "adder": 8.0}}


def conv_attrs(c, m, k, stride, group):
    return dict(kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)


def layer_model(node, inits, c, h, w):
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model


def fp32_model(w, b, c, h, wd, m, k, stride, group):
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], **conv_attrs(c, m, k, stride, group))
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    return layer_model(node, inits, c, h, wd)


def shift_model(w, b, c, h, wd, m, k, stride, group, terms):
    wt = torch.from_numpy(w.reshape(m, -1))
    e = pow2.channel_exponents(wt)
    codes = pow2.round_to_term_codes(wt, e, 5, terms).numpy()          # [T, M, C/G * K]
    inits = [numpy_helper.from_array(pow2.pack_codes(codes, 5), "W_codes"),
             numpy_helper.from_array(e.numpy(), "W_exponent"), numpy_helper.from_array(b, "B")]
    node = helper.make_node("ShiftConv", ["X", "W_codes", "W_exponent", "B"], ["Y"], domain=DOMAIN, out_channels=m,
                            terms=terms, **conv_attrs(c, m, k, stride, group))
    return layer_model(node, inits, c, h, wd)


def adder_model(w, b, c, h, wd, m, k, stride, group):
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    node = helper.make_node("AdderConv", ["X", "W", "B"], ["Y"], domain=DOMAIN, out_channels=m,
                            **conv_attrs(c, m, k, stride, group))
    return layer_model(node, inits, c, h, wd)


class _Reader(CalibrationDataReader):
    def __init__(self, xs):
        self.it = iter(xs)

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {"X": x}


def quiet_session(model, threads, ours=False):
    """Spinning off for intra- and inter-op threads in every session (interleaved sessions'
    spinning threads would steal the cores from the one that runs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if ours:
        opts.register_custom_ops_library(library_path())
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def clock_ghz():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return float("nan")


def isa():
    flags = open("/proc/cpuinfo").read()
    return "avx512" if "avx512bw" in flags and os.environ.get("MFCONVERT_ISA", "avx512") == "avx512" else "avx2"


def quiet_session_lib(model, threads, lib):
    """quiet_session with the op library at `lib` (--before)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.register_custom_ops_library(lib)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def cpu_time_ab(args):
    """--cpu-time N: before vs after vs fp32 per layer, 1 thread, fastest thread CPU time."""
    if not args.before:
        raise SystemExit("bench_conv: error: --cpu-time needs --before LIB")
    rng = np.random.default_rng(args.seed)
    print(f"ShiftConv kernel alone, 1 thread, fastest thread CPU time of {args.cpu_time} interleaved calls "
          f"(two terms: half as many); before = {args.before}, after = {library_path()}; load {os.getloadavg()}\n")
    print("| layer | 1 term: before µs | after µs | fp32 µs | after/before | fp32/ours before → after "
          f"| MAC/cycle after ({args.ghz} GHz) | 2 terms: before µs | after µs | after/before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (c, h, wd, m, k, stride, group) in LAYERS.items():
        if args.only not in name:
            continue
        w = (rng.standard_normal((m, c // group, k, k)) * 0.05).astype(np.float32)
        b = (rng.standard_normal(m) * 0.05).astype(np.float32)
        x = {"X": rng.standard_normal((1, c, h, wd)).astype(np.float32)}
        fp32 = quiet_session(fp32_model(w, b, c, h, wd, m, k, stride, group).SerializeToString(), 1)
        best = {}
        for terms, calls in ((1, args.cpu_time), (2, max(1, args.cpu_time // 2))):
            sm = shift_model(w, b, c, h, wd, m, k, stride, group, terms).SerializeToString()
            s = {"before": quiet_session_lib(sm, 1, args.before), "after": quiet_session(sm, 1, ours=True), "fp32": fp32}
            if not np.array_equal(s["before"].run(None, x)[0], s["after"].run(None, x)[0]):
                raise SystemExit(f"bench_conv: error: {name}, {terms} terms: before and after differ")
            t = {kk: float("inf") for kk in s}
            for _ in range(calls):
                for kk, sess in s.items():
                    t0 = time.thread_time()
                    sess.run(None, x)
                    t[kk] = min(t[kk], time.thread_time() - t0)
            best[terms] = t
        oh = (h + 2 * (k // 2) - k) // stride + 1
        macs = m * oh * oh * (c // group) * k * k
        t1, t2 = best[1], best[2]
        print(f"| {name} | {t1['before'] * 1e6:.0f} | {t1['after'] * 1e6:.0f} | {t1['fp32'] * 1e6:.0f} "
              f"| {t1['before'] / t1['after']:.2f}× | {t1['fp32'] / t1['before']:.2f}× → {t1['fp32'] / t1['after']:.2f}× "
              f"| {macs / (t1['after'] * args.ghz * 1e9):.1f} | {t2['before'] * 1e6:.0f} | {t2['after'] * 1e6:.0f} "
              f"| {t2['before'] / t2['after']:.2f}× |", flush=True)


def model_bench(args, threads_list):
    """MobileNetV2 end to end: fp32 vs data-free shift-conv conversions (1 term, auto)."""
    import statistics

    from bench_shift_linear import interleaved_samples

    from mfconvert.convert.config import ConvertConfig
    from mfconvert.convert.pipeline import PipelineOptions, convert_model
    from mfconvert.passes.conv import ShiftConvConfig
    from mfconvert.passes.shift_linear import ShiftLinearConfig
    from mfconvert.zoo import public

    if args.model != "mobilenetv2":
        raise SystemExit(f"bench_conv: error: --model {args.model!r}, expected mobilenetv2")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = str(public.mobilenet_v2("torchscript"))
    paths = {"fp32": fp32}
    for terms in ("1", "auto"):
        out = work / f"mobilenetv2-shift-{terms}.onnx"
        if not out.is_file():
            cfg = (ConvertConfig(shift_linear=ShiftLinearConfig(), shift_conv=ShiftConvConfig()) if terms == "auto" else
                   ConvertConfig(shift_linear=ShiftLinearConfig(terms=1), shift_conv=ShiftConvConfig(terms=1)))
            t0 = time.monotonic()
            res = convert_model(fp32, cfg, PipelineOptions(shift_terms=terms if terms == "auto" else 1))
            onnx.save(res.result.model, str(out))
            print(f"converted --shift-terms {terms} in {time.monotonic() - t0:.0f} s -> {out}", file=sys.stderr)
        paths[f"shift {terms}"] = str(out)
    ops = collections.Counter(n.op_type for n in onnx.load(paths["shift 1"]).graph.node)
    x = {"image": np.random.default_rng(args.seed).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    print(f"MobileNetV2 (torchscript export), batch 1, ONNX Runtime {ort.__version__}, spinning off, "
          f"{args.repeats} interleaved samples; converted ops: {dict(ops)}; load {os.getloadavg()}\n")
    print("| threads | fp32 ms | shift 1 term ms | shift auto ms | fp32/shift1 median (fastest) "
          "| fp32/auto median (fastest) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in threads_list:
        sessions = {k: quiet_session(p, threads, ours=k != "fp32") for k, p in paths.items()}
        ref = sessions["fp32"].run(None, x)[0]
        for k, sess in sessions.items():
            y = sess.run(None, x)[0]
            agree = int(np.argmax(y) == np.argmax(ref))
            print(f"{k}: top-1 on the random input agrees with fp32: {agree}", file=sys.stderr)
        samples = interleaved_samples({k: (lambda s=s: s.run(None, x)) for k, s in sessions.items()},
                                      args.repeats, sample_s=0.02)
        med = {k: statistics.median(v) for k, v in samples.items()}
        low = {k: min(v) for k, v in samples.items()}
        print(f"| {threads} | {med['fp32'] * 1e3:.2f} | {med['shift 1'] * 1e3:.2f} | {med['shift auto'] * 1e3:.2f} "
              f"| {med['fp32'] / med['shift 1']:.2f}× ({low['fp32'] / low['shift 1']:.2f}×) "
              f"| {med['fp32'] / med['shift auto']:.2f}× ({low['fp32'] / low['shift auto']:.2f}×) |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="layers whose name contains this")
    ap.add_argument("--before", default="", help="another build of the op library: a 'shift1 before' column")
    ap.add_argument("--model", default="", help="mobilenetv2: the whole model instead of the layers")
    ap.add_argument("--workdir", default="out/bench_conv", help="--model: where the conversions are kept")
    ap.add_argument("--cpu-time", type=int, default=0, help="N: the kernel alone by thread CPU time (needs --before)")
    ap.add_argument("--ghz", type=float, default=2.99, help="--cpu-time: core clock for MAC/cycle")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    if args.cpu_time:
        cpu_time_ab(args)
        return
    if args.model:
        model_bench(args, [int(t) for t in args.threads.split(",")])
        return
    rng = np.random.default_rng(args.seed)
    threads_list = [int(t) for t in args.threads.split(",")]
    ghz = clock_ghz()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (c, h, wd, m, k, stride, group) in LAYERS.items():
            if args.only not in name:
                continue
            w = (rng.standard_normal((m, c // group, k, k)) * 0.05).astype(np.float32)
            b = (rng.standard_normal(m) * 0.05).astype(np.float32)
            x = rng.standard_normal((1, c, h, wd)).astype(np.float32)
            fp32 = fp32_model(w, b, c, h, wd, m, k, stride, group)
            fp32_path, int8_path = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            onnx.save(fp32, fp32_path)
            quantize_static(fp32_path, int8_path, _Reader([rng.standard_normal(x.shape).astype(np.float32)
                                                           for _ in range(4)]),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            models = {"shift1": shift_model(w, b, c, h, wd, m, k, stride, group, 1).SerializeToString(),
                      "shift2": shift_model(w, b, c, h, wd, m, k, stride, group, 2).SerializeToString(),
                      "adder": adder_model(w, b, c, h, wd, m, k, stride, group).SerializeToString(),
                      "fp32": fp32.SerializeToString(), "int8": int8_path}
            oh = (h + 2 * (k // 2) - k) // stride + 1
            macs = m * oh * oh * (c // group) * k * k
            for threads in threads_list:
                sessions = {kind: quiet_session(mod, threads, ours=kind in ("shift1", "shift2", "adder"))
                            for kind, mod in models.items()}
                if args.before:
                    sessions["before"] = quiet_session_lib(models["shift1"], threads, args.before)
                feeds = {"X": x}
                runs = {kind: (lambda s=s: s.run(None, feeds)) for kind, s in sessions.items()}
                samples = interleaved_samples(runs, args.repeats)
                t = {kk: statistics.median(v) for kk, v in samples.items()}
                results.append((name, threads, macs, t, {kk: min(v) for kk, v in samples.items()}))
                print(f"{name} x{threads}: " + ", ".join(f"{kk} {v * 1e6:.0f} µs" for kk, v in t.items()),
                      file=sys.stderr, flush=True)

    lim = LIMIT[isa()]
    print(f"ShiftConv / AdderConv ({isa()}, 5-bit codes, Q16.16) vs ONNX Runtime {ort.__version__} Conv (fp32; "
          f"int8 = quantize_static QDQ per channel) on {cpu_name()} at a nominal {ghz:.2f} GHz, batch 1, "
          f"median of {args.repeats} interleaved samples, spinning off; ratios: medians (fastest samples); "
          f"MAC/cycle from the fastest samples; load {os.getloadavg()}\n")
    before = bool(args.before)
    print("| layer | threads | MMAC | " + ("shift1 before µs | " if before else "") +
          "shift1 µs | shift2 µs | adder µs | fp32 µs | int8 µs | " + ("before/shift1 | " if before else "") +
          "fp32/shift1 | fp32/shift2 | fp32/adder | int8/shift1 | MAC/cycle/thread shift1 · adder · fp32 "
          f"(limits {lim['shift']:.0f} · {lim['adder']:.1f} · 32) |")
    print("|---|---:|---:|" + ("---:|" if before else "") + "---:|---:|---:|---:|---:|" + ("---:|" if before else "")
          + "---:|---:|---:|---:|---|")
    for name, threads, macs, t, lo in results:
        per = {kk: macs / (v * ghz * 1e9 * threads) for kk, v in lo.items()}

        def ratio(a, b):  # median (fastest samples)
            return f"{t[a] / t[b]:.2f}× ({lo[a] / lo[b]:.2f}×)"

        print(f"| {name} | {threads} | {macs / 1e6:.1f} | " + (f"{t['before'] * 1e6:.0f} | " if before else "")
              + " | ".join(f"{t[kk] * 1e6:.0f}" for kk in KINDS)
              + (f" | {ratio('before', 'shift1')}" if before else "")
              + f" | {ratio('fp32', 'shift1')} | {ratio('fp32', 'shift2')} | {ratio('fp32', 'adder')} "
              f"| {ratio('int8', 'shift1')} | {per['shift1']:.1f} · {per['adder']:.1f} · {per['fp32']:.1f} |")


if __name__ == "__main__":
    main()
