"""Calibration and finetuning data: whatever the user has, as examples keyed by model input name.

An example is a dict {input name: np.ndarray without the batch axis}. Sources:
  - a text file, one example per line, with a Hugging Face tokenizer.json;
  - .npz (arrays keyed by input name, first axis = examples) or .npy (one input);
  - a folder of PNG/JPEG images with a preprocessing spec (calibrate/images.py);
  - any Python iterable of such dicts, or an ORT-style CalibrationDataReader (get_next()).
Batches pad variable-length axes (token sequences) with each input's pad value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from mfconvert.calibrate.text import read_text_file


BUCKET_WINDOW = 64    # batches per window that `Examples.batches(by_length=True)` sorts by length


class DataError(ValueError):
    """Bad calibration data; one line naming the file or the input."""


@dataclass
class Examples:
    items: list[dict[str, np.ndarray]]
    pad_values: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def split(self, held_out_fraction: float, seed: int = 0) -> tuple["Examples", "Examples"]:
        """(train, held_out): a seeded shuffle, then the last fraction held out."""
        if not 0 <= held_out_fraction < 1:
            raise DataError(f"held-out fraction must be in [0, 1), got {held_out_fraction}")
        order = np.random.default_rng(seed).permutation(len(self.items))
        n_held = int(round(len(order) * held_out_fraction))
        pick = lambda idx: Examples([self.items[i] for i in idx], self.pad_values)  # noqa: E731
        return pick(order[: len(order) - n_held]), pick(order[len(order) - n_held:])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                by_length: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the data in batches (the last one may be smaller). `by_length` sorts
        each window of BUCKET_WINDOW batches by example size before cutting it, so that a batch
        holds examples of similar length: padding (2.3× the real tokens for shuffled sentences
        in batches of 32) costs compute in every layer and drops to a few percent."""
        order = np.random.default_rng(seed).permutation(len(self.items)) if shuffle else np.arange(len(self.items))
        if by_length:
            window = batch_size * BUCKET_WINDOW
            sizes = np.array([sum(np.size(a) for a in item.values()) for item in self.items])
            order = np.concatenate([chunk[np.argsort(sizes[chunk], kind="stable")]
                                    for chunk in np.split(order, range(window, len(order), window))])
        for start in range(0, len(order), batch_size):
            yield collate([self.items[i] for i in order[start:start + batch_size]], self.pad_values)


def collate(items: list[dict[str, np.ndarray]], pad_values: dict[str, int]) -> dict[str, np.ndarray]:
    """Stack examples into a batch, padding axes whose lengths differ."""
    batch = {}
    for name in items[0]:
        arrays = [np.asarray(it[name]) for it in items]
        shape = np.max([a.shape for a in arrays], axis=0) if arrays[0].ndim else ()
        out = np.full((len(arrays), *shape), pad_values.get(name, 0), dtype=arrays[0].dtype)
        for i, a in enumerate(arrays):
            out[(i, *(slice(0, d) for d in a.shape))] = a
        batch[name] = out
    return batch


def fixed_batch(input_shapes) -> int | None:
    """The batch size a model fixes, from its data inputs' shapes (lists of dims, an int when
    static): the static first dim they all share (old exporters write [1, …]); None when any
    input's first dim is dynamic or they disagree. Rank-0 inputs do not count."""
    firsts = {dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
              for dims in input_shapes if dims is not None and len(dims)}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def model_fixed_batch(model) -> int | None:
    """fixed_batch of an onnx.ModelProto's data inputs."""
    initializers = {i.name for i in model.graph.initializer}
    shapes = []
    for i in model.graph.input:
        if i.name in initializers:
            continue
        t = i.type.tensor_type
        shapes.append([d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
                      if t.HasField("shape") else [None])
    return fixed_batch(shapes)


def session_fixed_batch(sess) -> int | None:
    """fixed_batch of an ONNX Runtime session's inputs."""
    return fixed_batch([list(i.shape) for i in sess.get_inputs()])


def chunks(batch: dict, size: int | None) -> list[tuple[dict, int]]:
    """[(chunk, real rows)]: `batch` cut along the batch axis into pieces of exactly `size` rows
    for a model that fixes its batch size, the last piece filled up by repeating its last row;
    the whole batch as one piece when `size` is None."""
    n = len(next(iter(batch.values()))) if batch else 0
    if size is None or n == size:
        return [(batch, n)]
    out = []
    for start in range(0, n, size):
        real = min(size, n - start)
        take = np.minimum(np.arange(start, start + size), start + real - 1)
        out.append(({k: v[take] for k, v in batch.items()}, real))
    return out


def run_chunked(run, batch: dict, size: int | None) -> list[np.ndarray]:
    """`run(feeds) -> [outputs]` on `batch`, piece by piece when the model fixes its batch size
    (`size`): each output's pieces, less the fill rows, joined along the first axis, which holds
    k values per row (k = 1 for [B, …], k = T for tokens flattened to [B·T, C]), as one run of
    the whole batch would give. An output whose pieces differ in shape comes from the first."""
    pieces = chunks(batch, size)
    if len(pieces) == 1 and pieces[0][1] == (size or pieces[0][1]):
        return list(run(pieces[0][0]))
    results = [([np.asarray(v) for v in run(feeds)], real) for feeds, real in pieces]
    joined = []
    for i, first in enumerate(results[0][0]):
        parts = []
        for values, real in results:
            v = values[i]
            parts.append(v[:v.shape[0] // size * real] if v.ndim and v.shape[0] % size == 0 else v)
        if first.ndim and len({p.shape[1:] for p in parts}) == 1:
            joined.append(np.concatenate(parts, axis=0))
        else:
            joined.append(first)
    return joined


def from_text(lines: list[str], tokenizer_json: str | os.PathLike, input_names: list[str],
              max_length: int = 128) -> Examples:
    """Tokenise one example per line for a transformer's inputs (ids, mask, token types)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer_json))
    except Exception as err:
        raise DataError(f"{tokenizer_json}: not a readable tokenizer.json ({err})") from None
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    unknown = [n for n in input_names if n not in fields]
    if unknown:
        raise DataError(f"text data can feed inputs {sorted(fields)}, the model also takes {unknown}")
    items = []
    for enc in tok.encode_batch(list(lines)):
        items.append({n: np.asarray(getattr(enc, fields[n]), dtype=np.int64) for n in input_names})
    return Examples(items, {"input_ids": tok.token_to_id("[PAD]") or 0})


def from_arrays(path: str | os.PathLike, input_names: list[str]) -> Examples:
    """.npz keyed by input name, or .npy for a one-input model; first axis = examples."""
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path}: not a readable .npy/.npz file ({err})") from None
    if isinstance(data, np.ndarray):
        if len(input_names) != 1:
            raise DataError(f"{path}: a .npy file feeds one input, the model takes {input_names}")
        arrays = {input_names[0]: data}
    else:
        missing = [n for n in input_names if n not in data.files]
        if missing:
            raise DataError(f"{path}: no arrays for inputs {missing} (file has {data.files})")
        arrays = {n: data[n] for n in input_names}
    counts = {n: len(a) for n, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: inputs have different numbers of examples {counts}")
    n = next(iter(counts.values()))
    return Examples([{k: a[i] for k, a in arrays.items()} for i in range(n)])


def from_iterable(source: Iterable[dict] | object, input_names: list[str]) -> Examples:
    """Examples from an iterable of dicts or a CalibrationDataReader (batched dicts are split)."""
    if hasattr(source, "get_next"):
        source = iter(source.get_next, None)
    items = []
    for record in source:
        missing = [n for n in input_names if n not in record]
        if missing:
            raise DataError(f"data record lacks inputs {missing} (has {sorted(record)})")
        arrays = {n: np.asarray(record[n]) for n in input_names}
        items.extend({n: a[i] for n, a in arrays.items()} for i in range(len(next(iter(arrays.values())))))
    return Examples(items)


def load_examples(source, input_names: list[str], tokenizer: str | None = None, max_length: int = 128,
                  image_spec=None) -> Examples:
    """Examples from a path (text file, .npy/.npz, image folder) or a Python object."""
    if not isinstance(source, (str, os.PathLike)):
        examples = from_iterable(source, input_names)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            from mfconvert.calibrate.images import from_image_folder
            examples = from_image_folder(path, input_names, image_spec)
        elif not os.path.isfile(path):
            raise DataError(f"{path}: no such file or directory")
        elif path.endswith((".npz", ".npy")):
            examples = from_arrays(path, input_names)
        else:
            if tokenizer is None:
                raise DataError(f"{path}: text data needs --tokenizer tokenizer.json")
            examples = from_text(read_text_file(path), tokenizer, input_names, max_length)
    if not len(examples):
        raise DataError(f"{source}: no examples")
    return examples


def check_against_model(examples: Examples, model, source: str) -> Examples:
    """Refuse data the model cannot take, naming `source` and the input: a dtype of another kind
    (integers for a float input, floats for token ids), the wrong rank or a wrong static dim,
    NaN or Inf. Floats are cast to a float input's dtype (np.save writes float64), integers that
    fit to an integer input's. `model`: the onnx.ModelProto the data feeds."""
    from onnx import helper

    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: i.type.tensor_type for i in model.graph.input if i.name not in initializers}
    items = [dict(item) for item in examples.items]
    for name, tensor_type in inputs.items():
        if not items or name not in items[0]:
            continue
        try:
            want = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:
            continue
        dims = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
                if tensor_type.HasField("shape") else None)
        for i, item in enumerate(items):
            a = np.asarray(item[name])
            where = f"{source}: input '{name}'"
            if want.kind == "f" and a.dtype.kind != "f" or want.kind in "iu" and a.dtype.kind not in "iu" \
                    or want.kind == "b" and a.dtype.kind != "b":
                raise DataError(f"{where} takes {want} data, got {a.dtype}")
            if dims is not None:
                shape = dims[1:]
                if a.ndim != len(shape) or any(isinstance(d, int) and d > 0 and d != n for d, n in zip(shape, a.shape)):
                    raise DataError(f"{where} takes examples of shape {_dims(shape)} (the model's {_dims(dims)} "
                                    f"less the batch axis), example {i} has shape {_dims(a.shape)}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise DataError(f"{where}: example {i} holds NaN or Inf; calibration data must be finite")
            if a.dtype.kind in "iu" and a.dtype != want and a.size and \
                    (a.min() < np.iinfo(want).min or a.max() > np.iinfo(want).max):
                raise DataError(f"{where} takes {want} data; example {i} holds values outside its range")
            item[name] = a.astype(want, copy=False)
    return Examples(items, examples.pad_values)


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
