"""MobileNetV2 through the whole conversion pipeline with --spatial-shift --data (BENCHMARKS.md,
"Spatial shifts"): the channels whose best shift explains less than THRESHOLD of their variance
kept depthwise (`keep_channels`), every other pass at its default, `--shift-terms TERMS`; prints
the conversion's notes, its op counts and the top-1 agreement with the original on the judged
crops (the same crops as bench/bench_spatial_shift.py: images 10–19 judged, 0–9 calibrate).

    nice .venv/bin/python bench/bench_spatial_shift_pipeline.py [THRESHOLD=0.9] [TERMS=2]
"""
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spatial_shift import convert, crops, logits  # noqa: E402

from mfconvert.calibrate.data import Examples  # noqa: E402
from mfconvert.calibrate.spatial_shift import channels_to_keep  # noqa: E402
from mfconvert.convert import ConvertConfig  # noqa: E402
from mfconvert.convert.pipeline import PipelineOptions, convert_model  # noqa: E402
from mfconvert.passes.spatial_shift import SpatialShiftConfig  # noqa: E402
from mfconvert.zoo.public import imagenet_images, mobilenet_v2  # noqa: E402


def main() -> None:
    threshold = float(sys.argv[1]) if len(sys.argv) > 1 else 0.9
    terms = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(1)   # the block training: one thread was faster per step on the shared machine
    path = str(mobilenet_v2("torchscript"))
    teacher = onnx.load(path)
    images, _ = imagenet_images()
    judged = crops(images[10:], 12, seed=1)
    top1 = logits(teacher, judged).argmax(1)
    calib = Examples([{"image": x} for x in crops(images[:10], 6, seed=3)])
    _, explained = channels_to_keep(teacher, calib, convert(teacher).report.changes, 0.0)
    keep = {k: [int(i) for i in np.flatnonzero(v < threshold)] for k, v in explained.items()}
    t0 = time.time()
    done = convert_model(path, ConvertConfig(spatial_shift=SpatialShiftConfig(keep_channels=keep)),
                         PipelineOptions(data=calib, shift_terms=terms, input_shapes={"image": [1, 3, 224, 224]}))
    print(f"converted in {time.time() - t0:.0f} s")
    print("\n".join(done.notes))
    print(dict(Counter(n.op_type for n in done.result.model.graph.node)))
    agree = float((logits(done.result.model, judged).argmax(1) == top1).mean())
    print(f"top-1 agreement with the original on {len(judged)} crops: {agree:.3f}")


if __name__ == "__main__":
    main()
