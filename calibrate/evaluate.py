"""How close a converted model is to the original on held-out data, both run in ONNX Runtime."""
from __future__ import annotations

import numpy as np

from mfconvert.calibrate.data import Examples
from mfconvert.metrics import mean_cosine, nearest_neighbour_agreement, sqnr_db
from mfconvert.runtime import session


def model_outputs(model, examples: Examples, batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """The first output for every example, one row each ([N, ...] flattened to [N, D])."""
    sess = session(model if isinstance(model, (str, bytes)) else model.SerializeToString(), threads=threads)
    rows = [sess.run(None, batch)[0] for batch in examples.batches(batch_size)]
    return np.concatenate([r.reshape(len(r), -1) for r in rows])


def fidelity(reference: np.ndarray, test: np.ndarray, logits: bool = False) -> dict[str, float]:
    """Mean cosine, nearest-neighbour agreement and SQNR of test rows against reference rows;
    for class scores (`logits`), the top-1 agreement instead of the neighbour agreement."""
    figures = {"mean_cosine": mean_cosine(reference, test), "sqnr_db": sqnr_db(reference, test)}
    if logits:
        figures["top1_agreement"] = float(np.mean(reference.argmax(1) == test.argmax(1)))
    elif len(reference) > 1:
        figures["nn_agreement"] = nearest_neighbour_agreement(reference, test)
    return figures
