"""The executor (nn.OnnxModule) against ONNX Runtime, op by op, on random inputs: one single-node
model per row, at each opset where the op's semantics changed (Softmax 11 vs 13, ReduceX with axes as
an attribute vs an input, Split/Squeeze/Pad/Clip/Resize/TopK forms, GroupNormalization 18 vs 21, …).
Float outputs within rtol 1e-3 / atol 1e-4 (float32 kernels that sum in different orders); integer
and boolean outputs exactly."""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as P
from onnx import helper as h

from mfconvert.nn.onnx_module import OnnxModule

rng = np.random.default_rng(0)


def f(*shape, lo=-2.0, hi=2.0):
    return lambda: rng.uniform(lo, hi, shape).astype(np.float32)


def pos(*shape):
    return f(*shape, lo=0.1, hi=2.0)


def i(*shape, lo=0, hi=4, dtype=np.int64):
    return lambda: rng.integers(lo, hi, shape).astype(dtype)


def u8(*shape):
    return i(*shape, lo=0, hi=255, dtype=np.uint8)


def c(value, dtype=None):
    arr = np.asarray(value, dtype=dtype)
    return lambda: arr


def _nan_inf():
    x = rng.normal(size=(3, 4)).astype(np.float32)
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    return x


def _rnn_inputs(kind, dirs, T=4, B=2, I=3, H=5, lens=True):
    g = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    ins = [f(T, B, I), f(dirs, g * H, I, lo=-0.5, hi=0.5), f(dirs, g * H, H, lo=-0.5, hi=0.5),
           f(dirs, 2 * g * H, lo=-0.5, hi=0.5)]
    ins.append(c([T, T - 2], np.int32) if lens else None)
    ins.append(f(dirs, B, H))
    if kind == "LSTM":
        ins += [f(dirs, B, H), f(dirs, 3 * H, lo=-0.5, hi=0.5)]
    return ins


# (id, op, opset, attrs, inputs (None = absent optional), number of outputs)
CASES = [
    # softmax family: opset < 13 coerces to 2-D at axis=1; 13 is per-axis (the 0.44 bug)
    ("softmax11", "Softmax", 11, {}, [f(2, 3, 4)], 1),
    ("softmax13", "Softmax", 13, {}, [f(2, 3, 4)], 1),
    ("logsoftmax11_axis", "LogSoftmax", 11, {"axis": 2}, [f(2, 3, 4)], 1),
    ("logsoftmax13", "LogSoftmax", 13, {"axis": 1}, [f(2, 3, 4)], 1),
    ("hardmax11", "Hardmax", 11, {}, [f(2, 3, 4)], 1),
    ("hardmax13", "Hardmax", 13, {"axis": 1}, [f(2, 3, 4)], 1),
    # elementwise math and activations
    ("elu", "Elu", 6, {"alpha": 0.7}, [f(3, 4)], 1),
    ("selu", "Selu", 6, {}, [f(3, 4)], 1),
    ("celu", "Celu", 12, {"alpha": 1.5}, [f(3, 4)], 1),
    ("softplus", "Softplus", 1, {}, [f(3, 4, lo=-30, hi=30)], 1),
    ("softsign", "Softsign", 1, {}, [f(3, 4)], 1),
    ("prelu_bcast", "PRelu", 16, {}, [f(2, 3, 4), f(3, 1)], 1),
    ("hardsigmoid", "HardSigmoid", 6, {"alpha": 0.3, "beta": 0.4}, [f(3, 4)], 1),
    ("hardswish", "HardSwish", 14, {}, [f(3, 4, lo=-5, hi=5)], 1),
    ("leakyrelu", "LeakyRelu", 16, {"alpha": 0.2}, [f(3, 4)], 1),
    ("thresholdedrelu", "ThresholdedRelu", 10, {"alpha": 0.5}, [f(3, 4)], 1),
    ("gelu_tanh", "Gelu", 20, {"approximate": "tanh"}, [f(3, 4)], 1),
    ("gelu", "Gelu", 20, {}, [f(3, 4)], 1),
    ("mish", "Mish", 18, {}, [f(3, 4)], 1),
    ("shrink", "Shrink", 9, {"bias": 0.2, "lambd": 0.7}, [f(3, 4)], 1),
    ("isnan", "IsNaN", 20, {}, [_nan_inf], 1),
    ("isinf_pos", "IsInf", 20, {"detect_negative": 0}, [_nan_inf], 1),
    ("erf", "Erf", 13, {}, [f(3, 4)], 1),
    ("sign_int", "Sign", 13, {}, [i(3, 4, lo=-3, hi=3, dtype=np.int32)], 1),
    ("round", "Round", 11, {}, [c([0.5, 1.5, 2.5, -0.5, -1.5, 1.2], np.float32)], 1),
    ("mod_int", "Mod", 13, {}, [i(3, 4, lo=-9, hi=9), c([3, -4, 5, -2], np.int64)], 1),
    ("mod_fmod", "Mod", 13, {"fmod": 1}, [f(3, 4, lo=-9, hi=9), pos(3, 4)], 1),
    ("div_int", "Div", 14, {}, [i(3, 4, lo=-9, hi=9, dtype=np.int32), c([2, -3, 4, 5], np.int32)], 1),
    ("pow_int_exp", "Pow", 15, {}, [pos(3, 4), i(3, 4, lo=0, hi=3)], 1),
    ("bitshift", "BitShift", 11, {"direction": "LEFT"},
     [i(6, lo=0, hi=60, dtype=np.uint8), i(6, lo=0, hi=3, dtype=np.uint8)], 1),
    ("clip6", "Clip", 6, {"min": -0.5, "max": 0.8}, [f(3, 4)], 1),
    ("clip13", "Clip", 13, {}, [f(3, 4), c(-0.5, np.float32), c(0.8, np.float32)], 1),
    ("clip13_int", "Clip", 13, {}, [i(3, 4, lo=-9, hi=9, dtype=np.int32), c(-2, np.int32), None], 1),
    ("max_var", "Max", 13, {}, [f(3, 4), f(4), f(1, 4)], 1),
    ("mean_var", "Mean", 13, {}, [f(3, 4), f(4)], 1),
    ("where_int", "Where", 16, {}, [i(3, 4, lo=0, hi=2, dtype=np.bool_), i(3, 4), i(4)], 1),
    ("gemm", "Gemm", 13, {"transB": 1, "alpha": 0.5, "beta": 2.0}, [f(3, 4), f(5, 4), f(5)], 1),
    ("matmul_bcast", "MatMul", 13, {}, [f(2, 1, 3, 4), f(3, 4, 5)], 1),
    # casts
    ("cast_f2i32", "Cast", 13, {"to": P.INT32}, [f(3, 4, lo=-50, hi=50)], 1),
    ("cast_f2u8", "Cast", 13, {"to": P.UINT8}, [f(3, 4, lo=0, hi=200)], 1),
    ("cast_f2f16", "Cast", 13, {"to": P.FLOAT16}, [f(3, 4)], 1),
    ("cast_f2bool", "Cast", 13, {"to": P.BOOL}, [c([[0.0, 1.5], [-0.0, 2.0]], np.float32)], 1),
    ("cast_i2f64", "Cast", 19, {"to": P.DOUBLE}, [i(3, 4, lo=-99, hi=99)], 1),
    ("castlike", "CastLike", 15, {}, [i(3, 4, dtype=np.int8), f(1)], 1),
    # shape and indexing
    ("reshape_zero", "Reshape", 14, {}, [f(2, 3, 4), c([0, -1], np.int64)], 1),
    ("flatten_neg", "Flatten", 13, {"axis": -1}, [f(2, 3, 4)], 1),
    ("expand", "Expand", 13, {}, [f(3, 1), c([2, 1, 4], np.int64)], 1),
    ("tile", "Tile", 13, {}, [f(2, 3), c([2, 3], np.int64)], 1),
    ("squeeze11", "Squeeze", 11, {"axes": [1]}, [f(2, 1, 4)], 1),
    ("squeeze13", "Squeeze", 13, {}, [f(2, 1, 4), c([-2], np.int64)], 1),
    ("unsqueeze11", "Unsqueeze", 11, {"axes": [0, 3]}, [f(2, 4)], 1),
    ("unsqueeze13", "Unsqueeze", 13, {}, [f(2, 4), c([0, -1], np.int64)], 1),
    ("split11", "Split", 11, {"axis": 1, "split": [1, 3]}, [f(2, 4)], 2),
    ("split13", "Split", 13, {"axis": 1}, [f(2, 4), c([3, 1], np.int64)], 2),
    ("split18_uneven", "Split", 18, {"axis": 1, "num_outputs": 3}, [f(2, 7)], 3),
    ("slice_negstep", "Slice", 13, {}, [f(5, 6), c([4, -1], np.int64), c([0, -100], np.int64),
                                         c([0, 1], np.int64), c([-2, -1], np.int64)], 1),
    ("slice9", "Slice", 9, {"starts": [1], "ends": [100], "axes": [1]}, [f(3, 6)], 1),
    ("pad11_reflect", "Pad", 11, {"mode": "reflect"}, [f(3, 4), c([1, 2, 2, 1], np.int64)], 1),
    ("pad18_axes_edge", "Pad", 18, {"mode": "edge"}, [f(2, 3, 4), c([1, 2], np.int64), None, c([2], np.int64)], 1),
    ("pad19_wrap", "Pad", 19, {"mode": "wrap"}, [f(3, 4), c([1, 2, 2, 1], np.int64)], 1),
    ("pad2_attr", "Pad", 2, {"pads": [0, 1, 0, 2], "value": 1.5}, [f(3, 4)], 1),
    ("pad_neg", "Pad", 13, {}, [f(3, 4), c([0, -1, 1, 0], np.int64), c(2.0, np.float32)], 1),
    ("gather_neg", "Gather", 13, {"axis": 1}, [f(3, 4), c([[-1, 0], [2, 1]], np.int64)], 1),
    ("gatherelements", "GatherElements", 13, {"axis": 1}, [f(3, 4), i(3, 2, lo=-4, hi=4)], 1),
    ("gathernd_batch", "GatherND", 13, {"batch_dims": 1}, [f(2, 3, 4), i(2, 2, 1, lo=0, hi=3)], 1),
    ("scatternd", "ScatterND", 13, {}, [f(4, 3), c([[1], [3]], np.int64), f(2, 3)], 1),
    ("scatternd_add", "ScatterND", 16, {"reduction": "add"}, [f(4, 3), c([[1], [1]], np.int64), f(2, 3)], 1),
    ("scatternd_max", "ScatterND", 18, {"reduction": "max"}, [f(4, 3), c([[1], [1]], np.int64), f(2, 3)], 1),
    ("scatterelements", "ScatterElements", 13, {"axis": 1},
     [f(3, 4), c([[1, 0], [2, 3], [0, 1]], np.int64), f(3, 2)], 1),
    ("scatterelements_mul", "ScatterElements", 18, {"axis": 0, "reduction": "mul"},
     [f(3, 4), c([[1, 0, 2, 2]], np.int64), f(1, 4)], 1),
    ("topk10", "TopK", 10, {"axis": 1}, [f(3, 6), c([2], np.int64)], 2),
    ("topk11_smallest", "TopK", 11, {"axis": 0, "largest": 0}, [f(5, 3), c([3], np.int64)], 2),
    ("cumsum_excl_rev", "CumSum", 14, {"exclusive": 1, "reverse": 1}, [f(3, 4), c(1, np.int64)], 1),
    ("cumsum_int", "CumSum", 14, {}, [i(3, 4, dtype=np.int32), c(0, np.int32)], 1),
    ("einsum", "Einsum", 12, {"equation": "bij,bjk->bik"}, [f(2, 3, 4), f(2, 4, 5)], 1),
    ("einsum_trace", "Einsum", 12, {"equation": "ii->i"}, [f(4, 4)], 1),
    ("trilu_upper", "Trilu", 14, {}, [f(2, 4, 5), c(1, np.int64)], 1),
    ("trilu_lower", "Trilu", 14, {"upper": 0}, [f(4, 5), c(-1, np.int64)], 1),
    ("onehot", "OneHot", 11, {"axis": 1},
     [c([[1, -1], [0, 3]], np.int64), c(4, np.int64), c([0.0, 2.0], np.float32)], 1),
    ("range_f", "Range", 11, {}, [c(1.0, np.float32), c(5.5, np.float32), c(0.7, np.float32)], 1),
    ("range_i", "Range", 11, {}, [c(10, np.int64), c(1, np.int64), c(-3, np.int64)], 1),
    ("nonzero", "NonZero", 13, {}, [i(3, 4, lo=0, hi=2)], 1),
    ("unique_sorted", "Unique", 11, {"axis": 0}, [c([[1, 2], [3, 4], [1, 2], [0, 1]], np.float32)], 4),
    ("unique_unsorted", "Unique", 11, {"sorted": 0}, [c([3, 1, 3, 2, 1, 5], np.float32)], 4),
    ("depthtospace_dcr", "DepthToSpace", 13, {"blocksize": 2}, [f(1, 8, 2, 3)], 1),
    ("depthtospace_crd", "DepthToSpace", 13, {"blocksize": 2, "mode": "CRD"}, [f(1, 8, 2, 3)], 1),
    ("spacetodepth", "SpaceToDepth", 13, {"blocksize": 2}, [f(1, 2, 4, 6)], 1),
    ("argmax_last", "ArgMax", 13, {"axis": 1, "select_last_index": 1}, [c([[1, 3, 3], [2, 2, 0]], np.float32)], 1),
    ("argmin_keep0", "ArgMin", 13, {"axis": 0, "keepdims": 0}, [f(3, 4)], 1),
    ("shape15", "Shape", 15, {"start": 1, "end": -1}, [f(2, 3, 4, 5)], 1),
    ("eyelike", "EyeLike", 9, {"k": 1}, [f(3, 4)], 1),
    ("compress", "Compress", 11, {"axis": 1}, [f(3, 4), c([True, False, True], np.bool_)], 1),
    # reductions: axes as an attribute (≤ 12 / 17) vs an input (13 ReduceSum, 18 the rest)
    ("reducesum11", "ReduceSum", 11, {"axes": [1], "keepdims": 0}, [f(2, 3, 4)], 1),
    ("reducesum13", "ReduceSum", 13, {}, [f(2, 3, 4), c([-1], np.int64)], 1),
    ("reducesum13_noop", "ReduceSum", 13, {"noop_with_empty_axes": 1}, [f(2, 3), None], 1),
    ("reducemean13", "ReduceMean", 13, {"axes": [0, 2]}, [f(2, 3, 4)], 1),
    ("reducemean18", "ReduceMean", 18, {"keepdims": 0}, [f(2, 3, 4), c([0, 2], np.int64)], 1),
    ("reducemax18_all", "ReduceMax", 18, {}, [f(2, 3, 4)], 1),
    ("reducemin13", "ReduceMin", 13, {"axes": [1]}, [i(2, 3, 4, dtype=np.int32)], 1),
    ("reducel1", "ReduceL1", 18, {}, [f(2, 3), c([1], np.int64)], 1),
    ("reducel2_13", "ReduceL2", 13, {"axes": [1]}, [f(2, 3)], 1),
    ("reducelogsumexp", "ReduceLogSumExp", 18, {}, [f(2, 3), c([0], np.int64)], 1),
    ("reducesumsquare", "ReduceSumSquare", 13, {"axes": [0]}, [f(2, 3)], 1),
    ("reduceprod18", "ReduceProd", 18, {}, [f(2, 3), c([1], np.int64)], 1),
    ("reducelogsum", "ReduceLogSum", 18, {}, [pos(2, 3), c([1], np.int64)], 1),
    # pooling
    ("maxpool_indices", "MaxPool", 12, {"kernel_shape": [2, 2], "strides": [2, 2]}, [f(1, 2, 5, 6)], 2),
    ("maxpool_ceil_dil", "MaxPool", 12, {"kernel_shape": [2, 2], "ceil_mode": 1, "dilations": [2, 1],
                                         "strides": [2, 2]}, [f(1, 2, 7, 7)], 1),
    ("maxpool_same", "MaxPool", 12, {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
     [f(1, 1, 5, 6)], 1),
    ("maxpool_colmajor", "MaxPool", 12, {"kernel_shape": [2, 2], "storage_order": 1, "pads": [1, 0, 0, 1]},
     [f(1, 2, 4, 4)], 2),
    ("maxpool_1d", "MaxPool", 10, {"kernel_shape": [3], "pads": [1, 1]}, [f(2, 3, 8)], 1),
    ("avgpool_incl", "AveragePool", 11, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
     [f(1, 2, 5, 5)], 1),
    ("avgpool_excl_ceil", "AveragePool", 11, {"kernel_shape": [3, 3], "pads": [0, 1, 1, 0], "ceil_mode": 1,
                                              "strides": [2, 2]}, [f(1, 2, 6, 6)], 1),
    ("avgpool19_dil", "AveragePool", 19, {"kernel_shape": [2, 2], "dilations": [2, 2]}, [f(1, 1, 6, 6)], 1),
    ("avgpool_3d", "AveragePool", 11, {"kernel_shape": [2, 2, 2]}, [f(1, 1, 4, 4, 4)], 1),
    ("lppool", "LpPool", 18, {"kernel_shape": [2, 2], "p": 3}, [f(1, 2, 4, 4)], 1),
    ("globalavgpool", "GlobalAveragePool", 1, {}, [f(2, 3, 4, 5)], 1),
    ("globalmaxpool", "GlobalMaxPool", 1, {}, [f(2, 3, 4, 5)], 1),
    ("globallppool", "GlobalLpPool", 2, {"p": 3}, [f(2, 3, 4, 5)], 1),
    # convolution
    ("conv_groups_dil", "Conv", 11, {"group": 2, "dilations": [2, 1], "pads": [1, 0, 2, 1]},
     [f(1, 4, 6, 6), f(6, 2, 2, 3), f(6)], 1),
    ("conv_same_lower", "Conv", 11, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, [f(1, 2, 5, 6), f(3, 2, 2, 2)], 1),
    ("conv_1d", "Conv", 11, {"strides": [2]}, [f(2, 3, 9), f(4, 3, 3)], 1),
    ("convtranspose_outpad", "ConvTranspose", 11, {"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 0, 0, 1]},
     [f(1, 2, 3, 3), f(2, 3, 3, 3), f(3)], 1),
    ("convtranspose_groups_dil", "ConvTranspose", 11, {"group": 2, "dilations": [2, 2]},
     [f(1, 4, 3, 3), f(4, 1, 2, 2)], 1),
    ("convtranspose_outshape", "ConvTranspose", 11, {"strides": [2, 2], "output_shape": [7, 8]},
     [f(1, 1, 3, 3), f(1, 2, 3, 3)], 1),
    ("convtranspose_same", "ConvTranspose", 11, {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
     [f(1, 1, 3, 3), f(1, 2, 3, 3)], 1),
    # resize: 10 (scales only, asymmetric/floor) vs 11/13/18/19 forms
    ("resize10_nearest", "Resize", 10, {"mode": "nearest"}, [f(1, 1, 3, 4), c([1, 1, 2.0, 1.5], np.float32)], 1),
    ("resize10_linear", "Resize", 10, {"mode": "linear"}, [f(1, 1, 3, 4), c([1, 1, 2.0, 1.5], np.float32)], 1),
    ("resize11_nearest_ceil", "Resize", 11, {"mode": "nearest", "nearest_mode": "ceil",
                                             "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
     [f(1, 1, 3, 4), c([], np.float32), c([1, 1, 1.7, 2.3], np.float32)], 1),
    ("resize13_linear_sizes", "Resize", 13, {"mode": "linear"},
     [f(1, 2, 4, 5), None, None, c([1, 2, 7, 3], np.int64)], 1),
    ("resize13_cubic_align", "Resize", 13, {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
     [f(1, 1, 4, 4), None, c([1, 1, 1.5, 0.75], np.float32)], 1),
    ("resize13_cubic_exclude", "Resize", 13, {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
     [f(1, 1, 4, 4), None, c([1, 1, 2.0, 2.0], np.float32)], 1),
    ("resize13_pytorch_half", "Resize", 13, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
     [f(1, 1, 4, 4), None, None, c([1, 1, 1, 6], np.int64)], 1),
    ("resize13_crop", "Resize", 13, {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                                     "extrapolation_value": 9.0},
     [f(1, 1, 4, 4), c([0, 0, 0.2, -0.3, 1, 1, 0.9, 1.2], np.float32), None, c([1, 1, 3, 3], np.int64)], 1),
    ("resize18_antialias", "Resize", 18, {"mode": "linear", "antialias": 1},
     [f(1, 1, 8, 8), None, c([1, 1, 0.5, 0.375], np.float32)], 1),
    ("resize18_axes_aspect", "Resize", 18,
     {"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
     [f(1, 1, 4, 6), None, None, c([8, 8], np.int64)], 1),
    ("resize19_symmetric", "Resize", 19, {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
     [f(1, 1, 4, 5), None, c([1, 1, 1.7, 0.6], np.float32)], 1),
    ("upsample9", "Upsample", 9, {"mode": "nearest"}, [f(1, 1, 2, 3), c([1, 1, 2, 3], np.float32)], 1),
    # normalization
    ("layernorm_outputs", "LayerNormalization", 17, {"axis": 1, "epsilon": 1e-3}, [f(2, 3, 4), f(3, 4), f(3, 4)], 3),
    ("layernorm_last", "LayerNormalization", 17, {}, [f(2, 3, 4), f(4)], 1),
    ("instancenorm", "InstanceNormalization", 6, {}, [f(2, 3, 4, 5), f(3), f(3)], 1),
    ("dropout12_mask", "Dropout", 12, {}, [f(3, 4)], 2),
    ("groupnorm21", "GroupNormalization", 21, {"num_groups": 2}, [f(2, 4, 3, 3), f(4), f(4)], 1),
    ("batchnorm9", "BatchNormalization", 9, {}, [f(2, 3, 4, 4), f(3), f(3), f(3), pos(3)], 1),
    ("batchnorm15", "BatchNormalization", 15, {"epsilon": 1e-2}, [f(2, 3, 4), f(3), f(3), f(3), pos(3)], 1),
    ("lrn", "LRN", 13, {"size": 3, "alpha": 0.01, "beta": 0.6, "bias": 1.5}, [f(1, 5, 3, 3)], 1),
    ("mvn", "MeanVarianceNormalization", 13, {}, [f(2, 3, 4, 4)], 1),
    ("mvn8_across", "MeanVarianceNormalization", 8, {"across_channels": 1}, [f(2, 3, 4, 4)], 1),
    ("mvn8_centre", "MeanVarianceNormalization", 8, {"normalize_variance": 0}, [f(2, 3, 4, 4)], 1),
    ("rmsnorm", "RMSNormalization", 23, {"axis": -1}, [f(2, 3, 4), f(4)], 1),
    ("lpnorm_l1", "LpNormalization", 1, {"p": 1, "axis": 0}, [f(3, 4)], 1),
    # quantization
    ("quantize_axis", "QuantizeLinear", 13, {"axis": 1},
     [f(2, 3, 4, lo=-20, hi=20), pos(3), c([0, 5, 250], np.uint8)], 1),
    ("quantize_blocked", "QuantizeLinear", 21, {"axis": 1, "block_size": 2},
     [f(2, 4, lo=-20, hi=20), pos(2, 2), c([[0, 1], [-3, 2]], np.int8)], 1),
    ("quantize_int16", "QuantizeLinear", 21, {}, [f(3, 4, lo=-1000, hi=1000), c(0.05, np.float32), c(3, np.int16)], 1),
    ("dequantize_axis", "DequantizeLinear", 13, {"axis": 0}, [i(3, 4, lo=-128, hi=127, dtype=np.int8), pos(3),
                                                             c([1, 0, -2], np.int8)], 1),
    ("dequantize_blocked", "DequantizeLinear", 21, {"axis": 0, "block_size": 2},
     [u8(4, 3), pos(2, 3), c([[1, 2, 3], [4, 5, 6]], np.uint8)], 1),
    ("dynamicquantize", "DynamicQuantizeLinear", 11, {}, [f(3, 4, lo=-3, hi=5)], 3),
    ("matmulinteger", "MatMulInteger", 10, {}, [u8(3, 4), u8(4, 5),
                                                c(12, np.uint8), c(130, np.uint8)], 1),
    ("convinteger", "ConvInteger", 10, {"pads": [1, 1, 1, 1]}, [u8(1, 2, 4, 4),
                                                             u8(3, 2, 2, 2),
                                                             c(7, np.uint8), c(100, np.uint8)], 1),
    ("qlinearmatmul", "QLinearMatMul", 10, {}, [u8(3, 4), c(0.02, np.float32), c(120, np.uint8),
                                                u8(4, 5), c(0.03, np.float32), c(128, np.uint8),
                                                c(0.1, np.float32), c(125, np.uint8)], 1),
    ("qlinearconv", "QLinearConv", 10, {}, [u8(1, 2, 4, 4), c(0.02, np.float32), c(120, np.uint8),
                                            u8(3, 2, 2, 2), c([0.03, 0.02, 0.01], np.float32),
                                            c([128, 128, 128], np.uint8), c(0.2, np.float32), c(110, np.uint8)], 1),
    # recurrent
    ("rnn_bidir", "RNN", 14, {"hidden_size": 5, "direction": "bidirectional"}, _rnn_inputs("RNN", 2), 2),
    ("gru_reverse_lbr", "GRU", 14, {"hidden_size": 5, "direction": "reverse", "linear_before_reset": 1},
     _rnn_inputs("GRU", 1), 2),
    ("gru_fwd", "GRU", 14, {"hidden_size": 5}, _rnn_inputs("GRU", 1, lens=False), 2),
    ("lstm_bidir_peep", "LSTM", 14, {"hidden_size": 5, "direction": "bidirectional"}, _rnn_inputs("LSTM", 2), 3),
    ("lstm_clip", "LSTM", 14, {"hidden_size": 5, "clip": 0.5}, _rnn_inputs("LSTM", 1, lens=False), 3),
    ("gru7_bidir", "GRU", 7, {"hidden_size": 5, "direction": "bidirectional"}, _rnn_inputs("GRU", 2), 2),
    # (layout=1, batch-first, ORT does not run: the backend *_batchwise cases cover it)
    ("rnn_activations", "RNN", 14, {"hidden_size": 5, "activations": ["HardSigmoid"], "activation_alpha": [0.3],
                                     "activation_beta": [0.4]}, _rnn_inputs("RNN", 1), 2),
    # attention, signal, image
    ("attention23_4d_causal", "Attention", 23, {"is_causal": 1}, [f(2, 2, 3, 4), f(2, 2, 5, 4), f(2, 2, 5, 6)], 1),
    ("attention23_3d_gqa_mask", "Attention", 23, {"q_num_heads": 4, "kv_num_heads": 2},
     [f(2, 3, 16), f(2, 5, 8), f(2, 5, 6), f(3, 5)], 1),
    ("dft17_onesided", "DFT", 17, {"axis": 1, "onesided": 1}, [f(2, 8, 1)], 1),
    ("dft20", "DFT", 20, {}, [f(2, 8, 1), None, c(1, np.int64)], 1),
    ("dft20_inverse", "DFT", 20, {"inverse": 1}, [f(2, 8, 2), None, c(-2, np.int64)], 1),
    ("stft", "STFT", 17, {"onesided": 1}, [f(1, 32, 1), c(4, np.int64), f(8), None], 1),
    ("hannwindow", "HannWindow", 17, {}, [c(10, np.int64)], 1),
    ("gridsample16", "GridSample", 16, {"mode": "bilinear", "padding_mode": "border"},
     [f(1, 2, 4, 5), f(1, 3, 3, 2, lo=-1.2, hi=1.2)], 1),
    ("gridsample20_nearest", "GridSample", 20, {"mode": "nearest", "align_corners": 1},
     [f(1, 2, 4, 5), f(1, 3, 3, 2, lo=-1, hi=1)], 1),
    ("roialign10_max", "RoiAlign", 10, {"output_height": 2, "output_width": 2, "mode": "max", "spatial_scale": 0.5},
     [f(1, 2, 6, 6), c([[0, 0, 8, 8], [2, 1, 10, 6]], np.float32), c([0, 0], np.int64)], 1),
    ("roialign16", "RoiAlign", 16, {"output_height": 2, "output_width": 3, "sampling_ratio": 2},
     [f(2, 2, 6, 6), c([[0, 0, 4, 4], [1, 1.5, 5, 3]], np.float32), c([0, 1], np.int64)], 1),
    ("col2im", "Col2Im", 18, {"strides": [2, 2]}, [f(1, 8, 4), c([5, 5], np.int64), c([2, 2], np.int64)], 1),
    ("nms", "NonMaxSuppression", 11, {},
     [c([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 2, 1, 3], [0, 2.05, 1, 3]]], np.float32),
      c([[[0.9, 0.8, 0.7, 0.95]]], np.float32), c([3], np.int64), c([0.5], np.float32),
                                          c([0.0], np.float32)], 1),
    ("affinegrid", "AffineGrid", 20, {}, [f(2, 2, 3), c([2, 1, 3, 4], np.int64)], 1),
    # experimental ops of opsets ≤ 9 that old exporters wrote and ONNX Runtime still runs
    ("imagescaler", "ImageScaler", 8, {"scale": 0.5, "bias": [1.0, 2.0, 3.0]}, [f(1, 3, 4, 5)], 1),
    ("scaledtanh", "ScaledTanh", 8, {"alpha": 2.0, "beta": 0.5}, [f(3, 4)], 1),
    ("parametricsoftplus", "ParametricSoftplus", 8, {"alpha": 2.0, "beta": 0.5}, [f(3, 4)], 1),
    ("scale", "Scale", 8, {"scale": 2.5}, [f(3, 4)], 1),
    ("dynamicslice", "DynamicSlice", 8, {}, [f(3, 5), c([1, 1], np.int64), c([3, 4], np.int64)], 1),
    ("crop", "Crop", 8, {"border": [1, 2, 0, 0], "scale": [2, 3]}, [f(1, 2, 5, 6)], 1),
    ("maxroipool", "MaxRoiPool", 1, {"pooled_shape": [2, 3], "spatial_scale": 0.5},
     [f(2, 2, 8, 8), c([[0, 1, 2, 9, 11], [1, 0, 0, 15, 5], [0, 14, 14, 15, 15]], np.float32)], 1),
    ("centercroppad", "CenterCropPad", 18, {"axes": [1, 2]}, [f(3, 5, 4), c([3, 7], np.int64)], 1),
    # com.microsoft fused ops of onnxruntime.transformers.optimizer
    ("ms_gelu", "com.microsoft:Gelu", 17, {}, [f(3, 4)], 1),
    ("ms_biasgelu", "com.microsoft:BiasGelu", 17, {}, [f(3, 4), f(4)], 1),
    ("ms_fastgelu", "com.microsoft:FastGelu", 17, {}, [f(3, 4), f(4)], 1),
    ("ms_quickgelu", "com.microsoft:QuickGelu", 17, {"alpha": 1.5}, [f(3, 4)], 1),
    ("ms_skiplayernorm", "com.microsoft:SkipLayerNormalization", 17, {"epsilon": 1e-5},
     [f(2, 3, 8), f(2, 3, 8), f(8), f(8), f(8)], 4),
    ("ms_skipsimplifiedln", "com.microsoft:SkipSimplifiedLayerNormalization", 17, {"epsilon": 1e-5},
     [f(2, 3, 8), f(2, 3, 8), f(8)], 1),
    ("simplifiedln", "SimplifiedLayerNormalization", 17, {"epsilon": 1e-5}, [f(2, 3, 8), f(8)], 1),
    ("ms_embedln", "com.microsoft:EmbedLayerNormalization", 17, {"epsilon": 1e-5},
     [i(2, 5, lo=0, hi=10, dtype=np.int32), i(2, 5, lo=0, hi=2, dtype=np.int32), f(10, 8), f(6, 8), f(2, 8), f(8), f(8),
      c([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)], 2),
    ("ms_attention_mask2d", "com.microsoft:Attention", 17, {"num_heads": 2},
     [f(2, 4, 8), f(8, 24, lo=-0.5, hi=0.5), f(24), c([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)], 1),
    ("ms_attention_mask1d_uni", "com.microsoft:Attention", 17, {"num_heads": 2, "unidirectional": 1},
     [f(2, 4, 8), f(8, 24, lo=-0.5, hi=0.5), f(24), c([3, 4], np.int32)], 1),
    ("ms_mha", "com.microsoft:MultiHeadAttention", 17, {"num_heads": 2},
     [f(2, 3, 8), f(2, 5, 8), f(2, 5, 8), f(24), c([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)], 1),
    ("ms_mha_bias4d", "com.microsoft:MultiHeadAttention", 17, {"num_heads": 2, "scale": 0.3},
     [f(1, 3, 8), f(1, 3, 8), f(1, 3, 8), None, None, f(1, 2, 3, 3)], 1),
    ("ms_fusedmatmul", "com.microsoft:FusedMatMul", 17, {"transB": 1, "alpha": 0.5}, [f(2, 3, 4), f(2, 5, 4)], 1),
    # com.microsoft ops of ORT's quantization tool and graph fusions
    ("ms_quantize_u16", "com.microsoft:QuantizeLinear", 17, {}, [f(3, 4, lo=-9, hi=9), c(0.01, np.float32),
                                                                   c(30000, np.uint16)], 1),
    ("ms_dequantize_i16", "com.microsoft:DequantizeLinear", 17, {}, [i(3, 4, lo=-999, hi=999, dtype=np.int16),
                                                                       c(0.01, np.float32), c(-7, np.int16)], 1),
    ("ms_matmulintegertofloat", "com.microsoft:MatMulIntegerToFloat", 17, {},
     [u8(3, 4), i(4, 5, lo=-128, hi=127, dtype=np.int8), c(0.02, np.float32), pos(5), c(120, np.uint8), None, f(5)], 1),
    ("ms_dynamicquantizematmul", "com.microsoft:DynamicQuantizeMatMul", 17, {},
     [f(3, 4), i(4, 5, lo=-128, hi=127, dtype=np.int8), c(0.02, np.float32), None, f(5)], 1),
    ("ms_qlinearadd", "com.microsoft:QLinearAdd", 17, {}, [u8(3, 4), c(0.05, np.float32), c(128, np.uint8), u8(4),
                                                          c(0.04, np.float32), c(120, np.uint8), c(0.07, np.float32),
                                                          c(125, np.uint8)], 1),
    ("ms_qlinearmul", "com.microsoft:QLinearMul", 17, {}, [u8(3, 4), c(0.05, np.float32), c(128, np.uint8), u8(3, 4),
                                                          c(0.04, np.float32), c(120, np.uint8), c(0.2, np.float32),
                                                          c(125, np.uint8)], 1),
    ("ms_qlinearsigmoid", "com.microsoft:QLinearSigmoid", 17, {}, [u8(3, 4), c(0.05, np.float32), c(128, np.uint8),
                                                                  c(1 / 256, np.float32), c(0, np.uint8)], 1),
    ("ms_qlinearleakyrelu", "com.microsoft:QLinearLeakyRelu", 17, {"alpha": 0.1},
     [u8(3, 4), c(0.05, np.float32), c(128, np.uint8), c(0.03, np.float32), c(100, np.uint8)], 1),
    ("ms_qlinearconcat", "com.microsoft:QLinearConcat", 17, {"axis": 1},
     [c(0.05, np.float32), c(128, np.uint8), u8(2, 3), c(0.04, np.float32), c(120, np.uint8), u8(2, 2),
      c(0.06, np.float32), c(130, np.uint8)], 1),
    ("ms_qlinearglobalavgpool", "com.microsoft:QLinearGlobalAveragePool", 17, {},
     [u8(1, 3, 4, 4), c(0.05, np.float32), c(128, np.uint8), c(0.01, np.float32), c(128, np.uint8)], 1),
    ("ms_qgemm_float", "com.microsoft:QGemm", 17, {"transB": 1},
     [u8(3, 4), c(0.02, np.float32), c(120, np.uint8), u8(5, 4), c(0.03, np.float32), c(128, np.uint8),
      i(5, lo=-500, hi=500, dtype=np.int32)], 1),
    ("ms_qgemm_quant", "com.microsoft:QGemm", 17, {"alpha": 0.5},
     [u8(3, 4), c(0.02, np.float32), c(120, np.uint8), u8(4, 5), c(0.03, np.float32), c(128, np.uint8), None,
      c(0.05, np.float32), c(100, np.uint8)], 1),
    ("ms_fusedconv", "com.microsoft:FusedConv", 17, {"activation": "LeakyRelu", "activation_params": [0.2],
                                                     "pads": [1, 1, 1, 1]}, [f(1, 2, 4, 4), f(3, 2, 3, 3), f(3)], 1),
    ("ms_fusedgemm", "com.microsoft:FusedGemm", 17, {"activation": "Relu", "transB": 1},
     [f(3, 4), f(5, 4), f(5)], 1),
]


def _model(op, opset, attrs, inputs, n_out):
    names = [f"x{k}" if spec is not None else "" for k, spec in enumerate(inputs)]
    while names and not names[-1]:
        names.pop()
    domain, _, op = op.rpartition(":")
    node = h.make_node(op, names, [f"y{k}" for k in range(n_out)], domain=domain or None, **attrs)
    feeds = {n: spec() for n, spec in zip(names, inputs) if n}
    graph = h.make_graph([node], op, [h.make_tensor_value_info(n, h.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                                      for n, v in feeds.items()], [h.make_empty_tensor_value_info(f"y{k}")
                                                                   for k in range(n_out)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)] + (
        [h.make_opsetid(domain, 1)] if domain else []))
    model.ir_version = 8 if opset < 21 else 10
    return model, feeds


@pytest.mark.parametrize("case", CASES, ids=[row[0] for row in CASES])
def test_executor_matches_onnxruntime(case, one_torch_thread):
    global rng
    name, op, opset, attrs, inputs, n_out = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))   # the same data whichever cases run
    model, feeds = _model(op, opset, attrs, inputs, n_out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    want = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        g = g.numpy()
        assert g.shape == w.shape, f"output {k}: shape {g.shape} vs ORT {w.shape}"
        assert g.dtype == w.dtype, f"output {k}: dtype {g.dtype} vs ORT {w.dtype}"
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-3, atol=1e-4,
                                       err_msg=f"output {k}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"output {k}")


def test_softmax_opset11_default_axis_is_not_opset13():
    """The seen bug: an opset-11 Softmax with the default axis normalises over all dims from 1 on."""
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    outs = {}
    for opset in (11, 13):
        model, _ = _model("Softmax", opset, {}, [c(x)], 1)
        outs[opset] = OnnxModule(model)(x0=torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(outs[11].reshape(2, -1).sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(outs[13].sum(-1), 1, rtol=1e-6)


def test_unknown_op_is_an_error_at_build_time():
    from mfconvert.nn.onnx_module import UnsupportedOp
    node = h.make_node("NoSuchOp", ["x"], ["y"], name="mystery")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", P.FLOAT, [2])],
                         [h.make_tensor_value_info("y", P.FLOAT, [2])])
    with pytest.raises(UnsupportedOp, match="node 'mystery': op NoSuchOp"):
        OnnxModule(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


GRAD_CASES = [
    ("Resize", 13, {"mode": "cubic"}, [(1, 1, 3, 3), None, c([1, 1, 1.5, 2.0], np.float32)]),
    ("Resize", 18, {"mode": "linear", "antialias": 1}, [(1, 1, 4, 4), None, c([1, 1, 0.5, 0.75], np.float32)]),
    ("ConvTranspose", 11, {"strides": [2, 2], "pads": [1, 0, 0, 1]}, [(1, 2, 2, 2), (2, 1, 3, 3)]),
    ("MaxPool", 12, {"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, [(1, 1, 3, 3)]),
    ("AveragePool", 19, {"kernel_shape": [2, 2], "dilations": [2, 1], "pads": [1, 0, 0, 1]}, [(1, 1, 4, 4)]),
    ("Pad", 19, {"mode": "reflect"}, [(2, 4), c([1, 2, 1, 3], np.int64)]),
    ("Slice", 13, {}, [(4, 3), c([3], np.int64), c([-10], np.int64), c([0], np.int64), c([-2], np.int64)]),
    ("LayerNormalization", 17, {}, [(2, 4), (4,), (4,)]),
    ("RMSNormalization", 23, {}, [(2, 4), (4,)]),
    ("Softmax", 11, {}, [(2, 2, 3)]),
    ("GridSample", 20, {"mode": "cubic"}, [(1, 1, 3, 3), (1, 2, 2, 2)]),
    ("Attention", 23, {"is_causal": 1}, [(1, 1, 2, 3), (1, 1, 3, 3), (1, 1, 3, 2)]),
    ("LSTM", 14, {"hidden_size": 2}, [(2, 1, 2), (1, 8, 2), (1, 8, 2)]),
    ("Einsum", 12, {"equation": "ij,jk->ik"}, [(2, 3), (3, 2)]),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"{r[0]}{r[1]}" for r in GRAD_CASES])
def test_executor_gradients(case):
    """Float inputs get analytic gradients through torch ops (float64 gradcheck)."""
    op, opset, attrs, specs = case
    gen = np.random.default_rng(2)
    inputs = [s if s is None or callable(s) else c(gen.uniform(-0.8, 0.8, s)) for s in specs]
    model, feeds = _model(op, opset, attrs, inputs, 1)
    module = OnnxModule(model)
    names = [n for n, v in feeds.items() if v.dtype == np.float64]
    consts = {n: torch.from_numpy(v) for n, v in feeds.items() if n not in names}
    leaves = [torch.from_numpy(feeds[n]).requires_grad_() for n in names]
    fn = lambda *xs: module(**dict(zip(names, xs)), **consts)[0]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


# Every dtype an op's schema allows that torch has: the executor against onnx.reference (ORT lacks
# kernels for many integer types), one op per family.
_DTYPE_OPS = [
    ("Add", 14, {}, 2), ("Sub", 14, {}, 2), ("Mul", 14, {}, 2), ("Div", 14, {}, 2), ("Max", 13, {}, 2),
    ("Min", 13, {}, 2), ("Sum", 13, {}, 2), ("Equal", 19, {}, 2), ("Less", 13, {}, 2), ("Greater", 13, {}, 2),
    ("Abs", 13, {}, 1), ("Neg", 13, {}, 1), ("Sign", 13, {}, 1), ("Relu", 14, {}, 1), ("Identity", 21, {}, 1),
    ("Mod", 13, {}, 2), ("BitwiseAnd", 18, {}, 2), ("BitwiseNot", 18, {}, 1), ("Clip", 13, {}, 1),
    ("Transpose", 21, {"perm": [1, 0, 2]}, 1), ("Flatten", 21, {"axis": 2}, 1), ("Concat", 13, {"axis": 1}, "concat"),
    ("Tile", 13, {}, "tile"), ("Expand", 13, {}, "expand"), ("Reshape", 21, {}, "reshape"), ("Slice", 13, {}, "slice"),
    ("Pad", 21, {"mode": "edge"}, "pad"), ("Gather", 13, {"axis": 1}, "gather"), ("Where", 16, {}, "where"),
    ("ReduceSum", 13, {}, 1), ("ReduceMax", 20, {}, "axes"), ("ReduceProd", 13, {"axes": [2]}, 1),
    ("ArgMax", 13, {"axis": 2}, 1), ("TopK", 11, {}, "topk"), ("CumSum", 14, {}, "cumsum"), ("Trilu", 14, {}, 1),
    ("GatherElements", 13, {"axis": 2}, "gather_elements"), ("ScatterElements", 18, {"axis": 1}, "scatter"),
    ("Cast", 21, {"to": P.FLOAT}, 1), ("Cast", 21, {"to": P.INT64}, 1), ("Cast", 21, {"to": P.UINT8}, 1),
    ("Cast", 21, {"to": P.BOOL}, 1), ("Cast", 21, {"to": P.FLOAT16}, 1), ("Cast", 21, {"to": P.UINT32}, 1),
]
_TORCH_TYPES = ["float16", "float", "double", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "bool"]


def _allowed(op, opset):
    schema = onnx.defs.get_schema(op, opset)
    first = schema.inputs[0].type_str
    for tc in schema.type_constraints:
        if tc.type_param_str == first:
            return {t[7:-1] for t in tc.allowed_type_strs}
    return {first[7:-1]}


_DTYPE_CASES = [(op, opset, attrs, kind, t) for op, opset, attrs, kind in _DTYPE_OPS for t in _TORCH_TYPES
                if t in _allowed(op, opset)]


def _data(t, shape, gen):
    dtype = np.dtype(h.tensor_dtype_to_np_dtype(getattr(P, t.upper())))
    if dtype == np.bool_:
        return gen.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.floating):
        return gen.uniform(-3, 3, shape).round(2).astype(dtype)
    lo = 0 if np.issubdtype(dtype, np.unsignedinteger) else -5
    return gen.integers(lo, 6, shape).astype(dtype)


@pytest.mark.parametrize("case", _DTYPE_CASES, ids=[f"{c[0]}{c[1]}-{c[2].get('to', '')}-{c[4]}" for c in _DTYPE_CASES])
def test_executor_dtypes_match_reference(case):
    from onnx.reference import ReferenceEvaluator
    op, opset, attrs, kind, t = case
    gen = np.random.default_rng(3)
    x = _data(t, (2, 3, 4), gen)
    extra = {"tile": [c([1, 2, 1], np.int64)], "expand": [c([2, 2, 3, 4], np.int64)],
             "reshape": [c([0, 4, -1], np.int64)], "concat": [c(_data(t, (2, 1, 4), gen))],
             "axes": [c([1], np.int64)], "slice": [c([2], np.int64), c([-10], np.int64), c([2], np.int64),
                                                           c([-1], np.int64)],
             "pad": [c([0, 1, 0, 0, 0, 2], np.int64)], "gather": [c([[2, 0], [1, 1]], np.int64)],
             "where": [c(gen.integers(0, 2, (3, 4)).astype(bool)), c(x)], "topk": [c([2], np.int64)],
             "cumsum": [c(2, np.int64)], "gather_elements": [c(gen.integers(0, 4, (2, 3, 2)).astype(np.int64))],
             "scatter": [c(gen.integers(0, 3, (2, 1, 4)).astype(np.int64)), c(_data(t, (2, 1, 4), gen))]}
    if kind == 2:
        y = _data(t, (3, 4), gen)
        if op in ("Div", "Mod") and not np.issubdtype(y.dtype, np.floating):
            y = np.where(y == 0, np.ones_like(y), y)
        inputs = [c(x), c(y)]
    elif kind == 1:
        inputs = [c(x)]
    elif kind == "where":
        inputs = [extra["where"][0], c(x), c(_data(t, (4,), gen))]
    else:
        inputs = [c(x)] + extra[kind]
    n_out = 2 if kind == "topk" else 1
    model, feeds = _model(op, opset, attrs, inputs, n_out)
    want = ReferenceEvaluator(model).run(None, feeds)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for g, w in zip(got, want):
        g, w = g.numpy(), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-2 if w.dtype == np.float16 else 1e-5)
        else:
            np.testing.assert_array_equal(g, w)


def test_model_local_functions_run_inline():
    """A model-local function (as the dynamo exporter writes) runs as its body."""
    fn = h.make_function("local", "Swishy", ["x"], ["y"],
                         [h.make_node("Sigmoid", ["x"], ["s"]), h.make_node("Mul", ["x", "s"], ["y"])],
                         [h.make_opsetid("", 18)])
    graph = h.make_graph([h.make_node("Swishy", ["x"], ["y"], domain="local")], "g",
                         [h.make_tensor_value_info("x", P.FLOAT, [3])], [h.make_tensor_value_info("y", P.FLOAT, [3])])
    model = h.make_model(graph, functions=[fn], opset_imports=[h.make_opsetid("", 18), h.make_opsetid("local", 1)])
    x = torch.tensor([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(OnnxModule(model)(x=x)[0].numpy(), (x * torch.sigmoid(x)).numpy(), rtol=1e-6)


def test_if_runs_the_branch_its_condition_picks():
    branch = lambda op: h.make_graph([h.make_node(op, ["x", "x"], ["out"])], op, [],
                                     [h.make_tensor_value_info("out", P.FLOAT, [2])])
    node = h.make_node("If", ["c"], ["y"], then_branch=branch("Add"), else_branch=branch("Mul"))
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("c", P.BOOL, []),
                                       h.make_tensor_value_info("x", P.FLOAT, [2])],
                         [h.make_tensor_value_info("y", P.FLOAT, [2])])
    module = OnnxModule(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    x = torch.tensor([3.0, -2.0])
    assert module(c=torch.tensor(True), x=x)[0].tolist() == [6.0, -4.0]
    assert module(c=torch.tensor(False), x=x)[0].tolist() == [9.0, 4.0]


def _export(module, args, names):
    import io
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, input_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "b"} for n in names})
    return onnx.load_from_string(buf.getvalue())


def _same_as_ort(model, feeds, atol=1e-5):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=atol)


class _Bert(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, attn_implementation=attn)
        self.bert = BertModel(cfg).eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


def _bert_feeds():
    gen = np.random.default_rng(4)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    return {"input_ids": gen.integers(0, 100, (2, 7)), "attention_mask": mask,
            "token_type_ids": np.zeros((2, 7), np.int64)}


def test_third_party_exports_run_as_in_ort():
    """What stopped finetuning on others' models: a transformers BERT with SDPA attention
    (TorchScript exporter: IsNaN, Where, GatherElements) and a ViT with an interpolated position
    embedding (Resize bicubic)."""
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTModel
    feeds = _bert_feeds()
    names = list(feeds)
    model = _export(_Bert("sdpa").eval(), tuple(torch.from_numpy(v) for v in feeds.values()), names)
    assert {"IsNaN", "Where"} <= {n.op_type for n in model.graph.node}
    _same_as_ort(model, feeds)

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)).eval()

    class Interpolated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return self.vit(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    x = np.random.default_rng(5).normal(size=(1, 3, 48, 40)).astype(np.float32)
    model = _export(Interpolated().eval(), (torch.from_numpy(x),), ["pixel_values"])
    assert "Resize" in {n.op_type for n in model.graph.node}
    _same_as_ort(model, {"pixel_values": x})


@pytest.mark.parametrize("gelu_approximation", [False, True])
def test_transformers_optimizer_fused_bert_runs_as_in_ort(gelu_approximation):
    """onnxruntime.transformers.optimizer's fusion of BERT: EmbedLayerNormalization, Attention,
    SkipLayerNormalization, BiasGelu or FastGelu (com.microsoft)."""
    import logging
    pytest.importorskip("transformers")
    from onnxruntime.transformers import optimizer
    feeds = _bert_feeds()
    model = _export(_Bert("eager").eval(), tuple(torch.from_numpy(v) for v in feeds.values()), list(feeds))
    options = optimizer.FusionOptions("bert")
    options.enable_gelu_approximation = gelu_approximation
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    fused = optimizer.optimize_model(model, model_type="bert", num_heads=4, hidden_size=32,
                                     optimization_options=options, opt_level=0).model
    ops = {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization",
            "FastGelu" if gelu_approximation else "BiasGelu"} <= ops
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in fused.graph.input}}
    _same_as_ort(fused, feeds)
