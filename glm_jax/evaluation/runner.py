"""One task over its data files: read, score, report per file and per group, cache.

Results of each file go to ``RESULTS/<task name>/<fingerprint>/<file>.result.json`` as
soon as the file is done (with the predictions and every choice's score); the fingerprint
covers the task file and the model identity the caller passes (``eval.py``: checkpoint,
quantization, dtype, prefix, adapter, vocabulary and glm_jax's source digest), so
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
from typing import Callable, Optional

from glm_jax.evaluation import metrics
from glm_jax.evaluation.task_config import TaskConfig


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


class Progress:
    """Samples done in one file, with rate and ETA on stderr at most every ``every`` seconds."""

    def __init__(self, label: str, total: int, log: Callable[[str], None], every: float = 10.0):
        self.label, self.total, self.log, self.every = label, total, log, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            self.log(f"    {self.label}: {self.done}/{self.total} samples, {rate:.1f}/s, "
                     f"ETA {(self.total - self.done) / rate:.0f} s")


def run_task(task: TaskConfig, data_root: str, evaluator, *, model_identity: dict, results: Optional[str] = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Evaluate ``task`` with ``evaluator`` (``glm_jax.evaluation.evaluator.Evaluator``);
    returns ``{"task", "type", "groups": {group: {"files": {file: {metrics, samples}},
    "stats": {metric: {max, median, average}}}}, "overall": {...}, "counts": {...}}``."""
    groups = task.file_groups(data_root)
    key = fingerprint(task, model_identity)
    root = os.path.join(data_root, task.path)
    out = {"task": task.name, "type": task.type, "groups": {}, "counts": {}}
    everything = {}
    total = sum(len(files) for files in groups.values())
    done = 0
    log(f"glm_jax.eval: {task.name} ({task.type}): {total} file(s) in {len(groups)} group(s)")
    limit = evaluator.max_seq_length(task)
    if limit < task.max_seq_length:
        log(f"  max_seq_length {task.max_seq_length} is more than the model's {limit}: contexts are cut to {limit}")
    # Every file is read (and every line checked) before the first is evaluated: a bad line
    # late in the task stops the run before the compute, not after it.
    read_counts: dict = {}
    data = {(group, rel): evaluator.read(task, os.path.join(root, rel), read_counts.setdefault((group, rel), {}))
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
                items = data[group, rel]
                progress = Progress(f"[{done}/{total}] {rel}", evaluator.size(task, items), log)
                record = evaluator.evaluate(task, items, progress)
                seconds = time.perf_counter() - t0
                stat = os.stat(data_file)
                record.update({"fingerprint": key, "model": model_identity, "data": [stat.st_size, int(stat.st_mtime)],
                               "counts": read_counts[group, rel], "seconds": round(seconds, 3)})
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
