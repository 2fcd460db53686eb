"""Classification metrics over a fleet (host-side numpy): accuracy, per-device mean accuracy,
macro-F1, expected calibration error, negative log-likelihood."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over ``bins`` equal-width
    confidence bins (``probs [N, C]``, ``labels [N]``)."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    # bin b holds confidences in (b / bins, (b + 1) / bins]; confidence >= 1 / C > 0
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    acc = np.bincount(idx, weights=correct, minlength=bins)
    cs = np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(acc - cs).sum() / len(labels))


def per_device_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logits [D, n, C]``, ``labels [D, n]`` -> accuracy of each device ``[D]``."""
    return (logits.argmax(-1) == labels).mean(-1)


def evaluate(logits, labels, num_classes: int, bins: int = 15) -> dict[str, float]:
    """``logits [D, n, C]``, ``labels [D, n]`` -> ``accuracy`` (all rows),
    ``device_accuracy`` (mean over devices of each device's accuracy), ``macro_f1``
    (classes absent from both labels and predictions are left out), ``ece``, ``nll``."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    probs = softmax(flat)
    pred = probs.argmax(-1)
    present = np.union1d(np.unique(y), np.unique(pred))
    return {
        "accuracy": float((pred == y).mean()),
        "device_accuracy": float(per_device_accuracy(logits, labels).mean()),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y, bins),
        "nll": float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-30)).mean()),
    }
