"""Metrics and how they are reported: per data file, then per group of files as the authors
report them (``BaseTask.calc_group_metrics``): the max, the median and the average
weighted by each file's sample count."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percent of predictions equal to their label (the authors' ``accuracy_metric``)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return 100.0 * sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)


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
