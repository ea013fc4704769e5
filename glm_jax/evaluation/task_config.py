"""Evaluation tasks in GLM-130B's format (its ``evaluation/configs.py`` and ``tasks/*.yaml``).

A task is a YAML file::

    name: "MMLU"
    type: "mul"                 # mul (multiple choice) | gen (generation) | lm (language modelling)
    path: "MMLU"                # the data directory, relative to the data root
    file-pattern:               # a glob, or groups of globs: group -> glob
      stem: "stem/*.json"
      humanities: "humanities/*.json"
    use_task_mask: false        # [gMASK] instead of [MASK]
    unidirectional: false
    max_seq_length: 2048

Keys are written with ``-`` or ``_`` (the authors mix them); generation tasks add
``sampling_strategy``, ``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``,
``min_gen_length``, ``max_gen_length``; language-modelling tasks ``generation_length``. An
unknown key, type or value is one line naming the file and the key, with the valid ones.
``module`` (the authors' custom Python task classes) is accepted and not run: glm_jax
evaluates every task of a type the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Optional, Union

import yaml

from glm_jax.errors import UserError

TYPES = ("mul", "gen", "lm")
STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")
# The metrics each type computes (GLM-130B's names); "Accuracy" of a generation task is
# LAMBADA's stripped exact match.
METRICS = {"mul": ("Accuracy",), "gen": ("EM", "F1", "Accuracy"), "lm": ("PPL",)}


class TaskError(UserError):
    """A task file or its data the evaluation cannot use (one line: the file, the problem)."""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str
    type: str
    path: str
    source: str = ""  # the YAML file this came from
    module: Optional[str] = None
    metrics: tuple[str, ...] = ()
    use_task_mask: bool = False
    use_multitask_encoding: bool = False
    unidirectional: bool = False
    max_seq_length: int = 2048
    file_pattern: Union[str, dict] = "**/*.json*"
    micro_batch_size: int = 1
    # gen
    sampling_strategy: str = "BaseStrategy"
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128
    # lm
    generation_length: int = 256

    def file_groups(self, data_root: str) -> dict[str, list[str]]:
        """Group name -> data files (sorted, relative to the task's directory), as the authors
        group them: one group ``all`` for a single pattern."""
        root = os.path.join(data_root, self.path)
        if not os.path.isdir(root):
            raise TaskError(f"{self.source}: path {self.path!r} is not a directory under the data root {data_root}")
        patterns = {"all": self.file_pattern} if isinstance(self.file_pattern, str) else dict(self.file_pattern)
        groups = {}
        for group, pattern in patterns.items():
            files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern), recursive=True)
                           if os.path.isfile(p))
            if not files:
                raise TaskError(f"{self.source}: file-pattern {pattern!r} (group {group}) matches no file under {root}")
            groups[str(group)] = files
        return groups


_COMMON = ("name", "type", "path", "module", "metrics", "use_task_mask", "use_multitask_encoding", "unidirectional",
           "max_seq_length", "file_pattern", "micro_batch_size")
KEYS = {
    "mul": _COMMON,
    "gen": _COMMON + ("sampling_strategy", "num_beams", "length_penalty", "no_repeat_ngram_size", "min_gen_length",
                      "max_gen_length"),
    "lm": _COMMON + ("generation_length",),
}
_TYPES = {f.name: f.type for f in dataclasses.fields(TaskConfig)}


def load_task(path: str) -> TaskConfig:
    """The task in YAML file ``path``, every key and value checked."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise TaskError(f"--task {path}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: not readable YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of task keys, got {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for key in ("name", "type", "path"):
        if key not in values:
            raise TaskError(f"{path}: no {key!r} (every task names its name, type and path)")
    kind = values["type"]
    if kind not in TYPES:
        raise TaskError(f"{path}: type {kind!r} is not one of {', '.join(TYPES)}")
    unknown = sorted(set(values) - set(KEYS[kind]))
    if unknown:
        raise TaskError(f"{path}: unknown key {unknown[0]!r} for a {kind} task; valid keys: {', '.join(KEYS[kind])}")
    for key, value in values.items():
        _check_value(path, key, value)
    if values.get("unidirectional") and not values.get("use_task_mask"):
        raise TaskError(f"{path}: unidirectional needs use_task_mask: true ([MASK] has no unidirectional form)")
    if values.get("use_multitask_encoding"):
        raise TaskError(f"{path}: use_multitask_encoding is not supported (nor by the authors' code)")
    if kind == "gen":
        gen, seq = values.get("max_gen_length", 128), values.get("max_seq_length", 2048)
        if seq - gen - 2 < 1:
            raise TaskError(f"{path}: max_gen_length {gen} leaves no room for a context in max_seq_length {seq}")
    if "metrics" in values:
        values["metrics"] = tuple(values["metrics"])
        bad = [m for m in values["metrics"] if m not in METRICS[kind]]
        if bad:
            raise TaskError(f"{path}: metric {bad[0]!r} is not computed for a {kind} task; valid: {', '.join(METRICS[kind])}")
    return TaskConfig(source=path, **values)


def _check_value(path: str, key: str, value) -> None:
    want = _TYPES[key]
    if key == "file_pattern":
        ok = isinstance(value, str) or (isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()))
        what = "a glob or a mapping of group -> glob"
    elif key == "metrics":
        ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
    elif key == "module":
        ok, what = value is None or isinstance(value, str), "a module name"
    elif want in ("bool",):
        ok, what = isinstance(value, bool), "true or false"
    elif want == "int":
        ok, what = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "a non-negative integer"
    elif want == "float":
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, str) and bool(value), "a non-empty string"
    if not ok:
        raise TaskError(f"{path}: {key}={value!r}; expected {what}")
    if key == "sampling_strategy" and value not in STRATEGIES:
        raise TaskError(f"{path}: sampling_strategy {value!r} is not one of {', '.join(STRATEGIES)}")
    if key == "max_seq_length" and value < 8:
        raise TaskError(f"{path}: max_seq_length={value}; expected at least 8")
