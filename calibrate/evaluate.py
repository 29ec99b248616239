"""How close a converted model is to the original on held-out data, both run in ONNX Runtime.

Outputs are kept per example, never stacked across batches: a token-level output ([B, T, C])
has another T in every batch. With an attention mask in the feed, a token-level example keeps
its real tokens only; without one it is compared as batched (padding included, the same in both
models). A model that fixes its batch size (inputs [1, …]) runs piece by piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mfconvert.calibrate.data import Examples, run_chunked, session_fixed_batch
from mfconvert.metrics import (cosine_per_example, nearest_neighbour_agreement, sqnr_db_examples,
                               top1_agreement_examples)
from mfconvert.runtime import session

MASK_INPUTS = ("attention_mask", "input_mask", "mask")   # feeds that mark real tokens (1) and padding (0)


@dataclass
class ModelOutputs:
    """{output name: one array per example}, in the order the examples were given."""
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.rows)


def output_names(outputs: list[tuple[str, bool]], wanted: list[str] | None, flag: str = "--outputs") -> list[str]:
    """The outputs to distil or compare, from [(name, is float)]: `wanted` checked (a ValueError
    naming an unknown or non-float one), else every float output."""
    names = [n for n, _ in outputs]
    floats = [n for n, is_float in outputs if is_float]
    if wanted:
        for name in wanted:
            if name not in names:
                raise ValueError(f"{flag}: the model has no output {name!r} (its outputs: {', '.join(names)})")
            if name not in floats:
                raise ValueError(f"{flag}: output {name!r} is not a float tensor; only float outputs can be "
                                 f"distilled or compared (float outputs: {', '.join(floats) or 'none'})")
        return list(dict.fromkeys(wanted))
    if not floats:
        raise ValueError(f"the model has no float output to distil or compare (outputs: {', '.join(names)})")
    return floats


def model_float_outputs(model) -> list[tuple[str, bool]]:
    """[(output name, is float)] of an onnx.ModelProto."""
    from onnx import TensorProto
    kinds = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return [(o.name, o.type.tensor_type.elem_type in kinds) for o in model.graph.output]


def mask_of(feeds: dict) -> np.ndarray | None:
    """The [B, T] attention mask of a batch (non-zero = real token), if the feed has one."""
    for name in MASK_INPUTS:
        if name in feeds and np.ndim(feeds[name]) == 2:
            return np.asarray(feeds[name]) != 0
    return None


def is_token_level(shape, mask_shape, declared=None, mask_declared=None) -> bool:
    """Whether an output of `shape` runs over the mask's tokens: [B, T, …] with the mask's
    [B, T]; a rank-2 [B, T] output only when the model declares its dim 1 as the mask's (a
    pooled [B, C] output could have C = T by chance)."""
    if mask_shape is None or len(shape) < 2 or tuple(shape[:2]) != tuple(mask_shape):
        return False
    if len(shape) >= 3:
        return True
    return declared is not None and mask_declared is not None and len(declared) > 1 and len(mask_declared) > 1 \
        and declared[1] is not None and declared[1] == mask_declared[1]


def split_examples(values: dict[str, np.ndarray], feeds: dict, declared: dict | None = None) -> dict[str, list]:
    """{output: [one array per example of the batch]}; token-level outputs keep only the real
    tokens where the feed has an attention mask. An output without a batch axis (first dim not
    the batch's) counts as one example per batch."""
    n = len(next(iter(feeds.values())))
    mask = mask_of(feeds)
    mask_name = next((m for m in MASK_INPUTS if m in feeds), None)
    declared = declared or {}
    out = {}
    for name, value in values.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != n:
            out[name] = [value]
            continue
        if mask is not None and is_token_level(value.shape, mask.shape, declared.get(name), declared.get(mask_name)):
            out[name] = [value[i][mask[i]] for i in range(n)]
        else:
            out[name] = [value[i] for i in range(n)]
    return out


def model_outputs(model, examples: Examples, batch_size: int = 64, threads: int | None = None,
                  outputs: list[str] | None = None) -> ModelOutputs:
    """The outputs named (default: every float output) for every example, per example."""
    sess = session(model if isinstance(model, (str, bytes)) else model.SerializeToString(), threads=threads)
    available = [(o.name, o.type in ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"))
                 for o in sess.get_outputs()]
    names = output_names(available, outputs)
    declared = {a.name: [d if isinstance(d, (int, str)) and d not in (0, "") else None for d in a.shape]
                for a in list(sess.get_inputs()) + list(sess.get_outputs())}
    limit = session_fixed_batch(sess)
    result = ModelOutputs({n: [] for n in names})
    for batch in examples.batches(batch_size):
        values = run_chunked(lambda feeds: sess.run(names, feeds), batch, limit)
        for name, rows in split_examples(dict(zip(names, values)), batch, declared).items():
            result.rows[name].extend(rows)
    return result


def _figures(ref: list[np.ndarray], test: list[np.ndarray], logits: bool) -> dict[str, float]:
    figures = {"mean_cosine": float(np.mean(cosine_per_example(ref, test))), "sqnr_db": sqnr_db_examples(ref, test)}
    if logits:
        figures["top1_agreement"] = top1_agreement_examples(ref, test)
    elif len(ref) > 1 and len({np.shape(r) for r in ref}) == 1:
        figures["nn_agreement"] = nearest_neighbour_agreement(np.reshape(ref, (len(ref), -1)),
                                                              np.reshape(test, (len(test), -1)))
    return figures


def fidelity(reference, test, logits: bool = False) -> dict:
    """Mean per-example cosine, nearest-neighbour agreement and SQNR of test against reference;
    for class scores (`logits`), the top-1 agreement (per example, or per token for token-level
    scores) instead of the neighbour agreement. `reference`/`test`: ModelOutputs or [N, D] rows.
    With several outputs each figure is the mean over the outputs (those that have it) and
    "per_output" holds each output's own."""
    if not isinstance(reference, ModelOutputs):
        reference, test = ModelOutputs({"": list(np.asarray(reference))}), ModelOutputs({"": list(np.asarray(test))})
    if reference.names != test.names:
        raise ValueError(f"outputs differ: reference {reference.names} vs test {test.names}")
    per = {n: _figures(reference.rows[n], test.rows[n], logits) for n in reference.names}
    if len(per) == 1:
        return next(iter(per.values()))
    keys = list(dict.fromkeys(k for f in per.values() for k in f))
    figures: dict = {k: float(np.mean([f[k] for f in per.values() if k in f])) for k in keys}
    figures["per_output"] = per
    return figures
