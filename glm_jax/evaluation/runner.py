"""One task over its data files: read, score, report per file and per group, cache.

Results of each file go to ``RESULTS/<task name>/<fingerprint>/<file>.result.json`` as
soon as the file is done (with the predictions and every choice's score); the fingerprint
covers the task file and the model (checkpoint, quantization, dtype, prefix, adapter), so
one results directory holds float, INT8 and INT4 runs side by side, and a rerun of the
same model reads its results back instead of evaluating again: an interrupted evaluation
resumes at the file it was on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from glm_jax.evaluation import metrics, samples
from glm_jax.evaluation.task_config import TaskConfig, TaskError


def fingerprint(task: TaskConfig, model_identity: dict) -> str:
    """What a cached result depends on: the task file's contents and the model's identity."""
    with open(task.source, "rb") as f:
        task_bytes = f.read()
    blob = json.dumps({"task": hashlib.sha256(task_bytes).hexdigest(), "model": model_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path(results: str, task: TaskConfig, key: str, rel: str) -> str:
    return os.path.join(results, task.name, key, rel + ".result.json")


def _cached(path: Optional[str], key: str, data_file: str) -> Optional[dict]:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            got = json.load(f)
    except (OSError, ValueError):
        return None  # a torn write: evaluate the file again
    stat = os.stat(data_file)
    if got.get("fingerprint") != key or got.get("data") != [stat.st_size, int(stat.st_mtime)]:
        return None
    return got


def _write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def run_task(task: TaskConfig, data_root: str, score: Callable[[Sequence[samples.ChoiceSample], bool], list],
             encode: Callable[[str], Sequence[int]], *, model_identity: dict, results: Optional[str] = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Evaluate ``task``; returns ``{"task", "type", "groups": {group: {"files": {file: {...}},
    "stats": {metric: {max, median, average}}}}, "overall": {...}, "counts": {...}}``.

    score(samples, use_task_mask) -> each sample's choice scores (``multiple_choice.Scorer``).
    """
    if task.type != "mul":
        raise TaskError(f"{task.source}: type {task.type!r} tasks are not evaluated yet; this version runs "
                        "multiple-choice (mul) tasks")
    groups = task.file_groups(data_root)
    key = fingerprint(task, model_identity)
    root = os.path.join(data_root, task.path)
    out = {"task": task.name, "type": task.type, "groups": {}, "counts": {}}
    everything = {}
    total = sum(len(files) for files in groups.values())
    done = 0
    log(f"glm_jax.eval: {task.name} ({task.type}): {total} file(s) in {len(groups)} group(s)")
    # Every file is read (and every line checked) before the first is scored: a bad line
    # late in the task stops the run before the compute, not after it.
    read_counts: dict = {}
    data = {(group, rel): samples.read_choice_file(os.path.join(root, rel), encode, task.max_seq_length,
                                                   read_counts.setdefault((group, rel), {}))
            for group, files in groups.items() for rel in files}
    for group, files in groups.items():
        per_file = {}
        records = {}
        for rel in files:
            done += 1
            data_file = os.path.join(root, rel)
            cache = _cache_path(results, task, key, rel) if results else None
            record = _cached(cache, key, data_file)
            if record is None:
                t0 = time.perf_counter()
                items, counts = data[group, rel], read_counts[group, rel]
                choice_scores = score(items, task.use_task_mask)
                predictions = [int(np.argmax(s)) for s in choice_scores]
                labels = [s.label for s in items]
                seconds = time.perf_counter() - t0
                stat = os.stat(data_file)
                record = {"fingerprint": key, "model": model_identity, "data": [stat.st_size, int(stat.st_mtime)], "samples": len(items),
                          "metrics": {"Accuracy": metrics.accuracy(predictions, labels)}, "predictions": predictions,
                          "labels": labels, "scores": choice_scores, "counts": counts,
                          "seconds": round(seconds, 3)}
                if cache:
                    _write(cache, record)
                how = f"{record['samples'] / seconds:.1f} samples/s"
            else:
                how = "cached"
            for k, v in record["counts"].items():
                out["counts"][k] = out["counts"].get(k, 0) + v
            per_file[rel] = (record["metrics"], record["samples"])
            records[rel] = {"metrics": record["metrics"], "samples": record["samples"]}
            shown = ", ".join(f"{k} = {v:.3f}" for k, v in record["metrics"].items())
            log(f"  [{done}/{total}] {group}: {rel}: {shown} ({record['samples']} samples, {how})")
        stats = metrics.group_stats(per_file)
        out["groups"][group] = {"files": records, "stats": stats}
        everything.update({(group, k): v for k, v in per_file.items()})
        for name, s in stats.items():
            log(f"  group {group} {name}: max = {s['max']:.3f}, median = {s['median']:.3f}, average = {s['average']:.3f}")
    out["overall"] = metrics.group_stats(everything)
    return out
