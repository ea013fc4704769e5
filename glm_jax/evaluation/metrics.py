"""Metrics and how they are reported: per data file, then per group of files as the authors
report them (``BaseTask.calc_group_metrics``): the max, the median and the average
weighted by each file's sample count.

Exact match and F1 are SQuAD's, as GLM-130B's ``evaluation/metrics.py`` computes them:
both texts lower-cased, punctuation and the articles a/an/the removed, whitespace
collapsed; F1 over the words in common; each prediction scored against its best target;
percent over the samples. Perplexity is the authors': ``exp(min(20, loss / words))``, the
summed negative log-likelihood over the document's words (counted by spaces).
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, Sequence

import numpy as np



def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percent of predictions equal to their label (the authors' ``accuracy_metric``)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def f1(prediction: str, target: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def stripped_match(prediction: str, target: str) -> float:
    """LAMBADA's exact match: the texts equal once stripped of surrounding whitespace."""
    return float(prediction.strip() == target.strip())


def best_over_targets(metric: Callable[[str, str], float], predictions: Sequence[str],
                      targets: Sequence[Sequence[str]]) -> float:
    """Percent: each prediction scored against its best target (no target scores 0)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} samples")
    total = sum(max((metric(p, t) for t in ts), default=0.0) for p, ts in zip(predictions, targets))
    return 100.0 * total / max(len(predictions), 1)


def perplexity(loss: float, words: int) -> float:
    return math.exp(min(20.0, loss / words))


def group_stats(per_file: dict[str, tuple[dict[str, float], int]]) -> dict[str, dict[str, float]]:
    """``{file: ({metric: value}, samples)}`` -> ``{metric: {max, median, average}}``."""
    values: dict[str, list[float]] = {}
    weights = []
    for metrics, n in per_file.values():
        for name, v in metrics.items():
            values.setdefault(name, []).append(v)
        weights.append(n)
    return {name: {"max": float(np.max(v)), "median": float(np.median(v)),
                   "average": float(np.average(v, weights=weights))} for name, v in values.items()}
