"""Fidelity of a converted model's embeddings to the original's.

All functions take ``ref`` (original model) and ``test`` (converted model) arrays of the same
shape [N, D], one embedding per row, and compute in float64.
"""
from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _pair(ref, test) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: ref {ref.shape} vs test {test.shape}")
    if ref.ndim == 1:
        ref, test = ref[None], test[None]
    if ref.ndim != 2:
        raise ValueError(f"expected [N, D] embeddings, got shape {ref.shape}")
    return ref, test


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def cosine_per_row(ref, test) -> np.ndarray:
    """Cosine similarity of each test row to its reference row, shape [N]."""
    ref, test = _pair(ref, test)
    return np.sum(_unit_rows(ref) * _unit_rows(test), axis=1)


def mean_cosine(ref, test) -> float:
    """Mean row-wise cosine similarity: what retrieval/similarity users of an embedding model
    see, since they compare directions and ignore norms. 1.0 means identical directions."""
    return float(np.mean(cosine_per_row(ref, test)))


def _nearest_other(x: np.ndarray) -> np.ndarray:
    unit = _unit_rows(x)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)  # a row is never its own neighbour
    return np.argmax(sim, axis=1)   # ties: lowest index, the same rule for ref and test


def nearest_neighbour_agreement(ref, test) -> float:
    """Fraction of rows whose top-1 nearest neighbour (by cosine, among the other rows) is the
    same row in ``test`` as in ``ref``. Measures whether the conversion preserves search
    results, which a high mean cosine alone does not guarantee when neighbours are close."""
    ref, test = _pair(ref, test)
    if ref.shape[0] < 2:
        raise ValueError("nearest-neighbour agreement needs at least 2 rows")
    return float(np.mean(_nearest_other(ref) == _nearest_other(test)))


def sqnr_db(ref, test) -> float:
    """Signal-to-quantisation-noise ratio 20*log10(||ref|| / ||ref - test||) in dB, over the
    whole array: the usual scale-aware error measure for quantised models (about 6 dB per bit);
    +inf when test equals ref."""
    ref, test = _pair(ref, test)
    noise = np.linalg.norm(ref - test)
    if noise == 0.0:
        return float("inf")
    return float(20.0 * np.log10(np.linalg.norm(ref) / noise))


# Outputs of several batches cannot be stacked into one [N, D] array when an output is
# token-level ([B, T, C], T varying by batch): these take one array per example, any shapes,
# ref and test pairwise alike, and aggregate over all of them.

def _pairs(refs, tests) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(refs) != len(tests):
        raise ValueError(f"{len(refs)} reference examples vs {len(tests)} test examples")
    pairs = []
    for i, (r, t) in enumerate(zip(refs, tests)):
        r, t = np.asarray(r, dtype=np.float64), np.asarray(t, dtype=np.float64)
        if r.shape != t.shape:
            raise ValueError(f"example {i}: shape mismatch: ref {r.shape} vs test {t.shape}")
        pairs.append((r.reshape(-1), t.reshape(-1)))
    return pairs


def cosine_per_example(refs, tests) -> np.ndarray:
    """Cosine of each example's whole (flattened) test output to its reference, shape [N]."""
    return np.array([float(r @ t / max(np.linalg.norm(r) * np.linalg.norm(t), _EPS))
                     for r, t in _pairs(refs, tests)])


def sqnr_db_examples(refs, tests) -> float:
    """sqnr_db over every value of every example (as if all were one array)."""
    pairs = _pairs(refs, tests)
    signal = sum(float(r @ r) for r, _ in pairs)
    noise = sum(float((r - t) @ (r - t)) for r, t in pairs)
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(signal / noise))


def top1_agreement_examples(refs, tests) -> float:
    """Fraction of positions (each example's rows over its last axis: one per example for
    [C] class scores, one per token for [T, C]) whose arg-max class is the same."""
    _pairs(refs, tests)   # the same shapes
    rows = lambda a: np.reshape(a, (-1, np.shape(a)[-1] if np.ndim(a) else 1))  # noqa: E731
    same = [np.argmax(rows(r), -1) == np.argmax(rows(t), -1) for r, t in zip(refs, tests) if np.size(r)]
    return float(np.mean(np.concatenate(same))) if same else float("nan")
