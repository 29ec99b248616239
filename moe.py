"""Routing statistics of a converted model's MoE MLP blocks: how many tokens each expert took.

The pass records each block's router ArgMax tensor in the model metadata; here a copy of the
model exposes those tensors as outputs, runs on the given data and counts. The converted model
itself keeps its interface.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from mfconvert.passes.moe_mlp import ROUTES_KEY


@dataclass
class RoutingSplit:
    """Tokens one block sent to each expert."""
    mult: int = 0
    shift: int = 0

    @property
    def shift_fraction(self) -> float:
        total = self.mult + self.shift
        return self.shift / total if total else float("nan")


def routes(model: onnx.ModelProto) -> dict[str, str]:
    """{block: router ArgMax tensor} as the moe-mlp pass recorded it (empty if no MoE blocks)."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get(ROUTES_KEY, "{}"))


def router_logits(model: onnx.ModelProto) -> dict[str, str]:
    """{block: router logits tensor}: the input of each block's recorded ArgMax node (what the
    finetune's load-balancing loss reads)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for block, route in routes(model).items():
        node = producer.get(route)
        if node is None or node.op_type != "ArgMax":
            raise ValueError(f"MoE block {block}: its route tensor '{route}' is not an ArgMax output")
        out[block] = node.input[0]
    return out


def expert_latent_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{Shift expert ShiftLinear node: float weight [out, in]}: the Mult expert's weights of the
    same block (the original MLP's), as latent weights for finetuning the Shift expert."""
    from onnx import numpy_helper

    from mfconvert.passes.moe_mlp import expert_pairs

    inits = {i.name: i for i in model.graph.initializer}
    return {shift: numpy_helper.to_array(inits[weight]).copy() for shift, weight in expert_pairs(model).items()
            if weight in inits}


def routing_split(model, feeds: dict | Iterable[dict], threads: int | None = None,
                  mask_input: str = "attention_mask") -> dict[str, RoutingSplit]:
    """Run `model` (path or ModelProto) on one feed dict or an iterable of them and count the
    tokens each MoE block routed to each expert. Where a feed has `mask_input` with one entry
    per routed token (text models' attention mask), padding tokens (mask 0) are not counted:
    they exist only because of batching."""
    from mfconvert.calibrate.data import chunks, model_fixed_batch
    from mfconvert.runtime import session

    model = onnx.load(model) if not isinstance(model, onnx.ModelProto) else model
    blocks = routes(model)
    if not blocks:
        raise ValueError("the model has no MoE MLP blocks (convert it with --moe-mlp)")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in blocks.values():
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.INT64, None))
    sess = session(probe.SerializeToString(), threads=threads)
    limit = model_fixed_batch(model)
    names = list(blocks.values())
    splits = {block: RoutingSplit() for block in blocks}
    for feed in [feeds] if isinstance(feeds, dict) else feeds:
        for piece, real in chunks({k: np.asarray(v) for k, v in feed.items()}, limit):   # inputs [1, …]
            rows = len(next(iter(piece.values())))
            mask = piece[mask_input][:real].reshape(-1) != 0 if mask_input in piece else None
            for block, route in zip(blocks, sess.run(names, piece)):
                route = np.asarray(route).reshape(-1)
                if real < rows and route.size % rows == 0:   # fill rows: each the same share of the routes
                    route = route[: route.size // rows * real]
                if mask is not None and mask.size == route.size:
                    route = route[mask]
                counts = np.bincount(route, minlength=2)
                splits[block].mult += int(counts[0])
                splits[block].shift += int(counts[1])
    return splits


def split_table(splits: dict[str, RoutingSplit]) -> str:
    """The per-block split as text, one line per block."""
    width = max(len(b) for b in splits)
    lines = [f"{'block'.ljust(width)}  mult tokens  shift tokens  shift %"]
    lines += [f"{b.ljust(width)}  {s.mult:11d}  {s.shift:12d}  {100 * s.shift_fraction:7.1f}"
              for b, s in splits.items()]
    return "\n".join(lines)
