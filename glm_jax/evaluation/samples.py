"""Reading a task's data files: JSON lines in GLM-130B's evaluation format.

Each line is an object with ``inputs_pretokenized`` (text) or ``inputs`` (model ids), and
for a multiple-choice task ``choices_pretokenized`` (a list of texts) or ``choices`` (a list
of id lists) and ``label`` (the index of the right choice); generation tasks have
``targets_pretokenized`` / ``targets``. Text is tokenized with the model's vocabulary,
each choice on its own, as the authors' ``get_tokenized_input`` does.

As the authors' datasets do, a context too long for ``max_seq_length`` with its choices is
cut from the left (and counted); anything else wrong with a line (not JSON, a missing or
mistyped field, a label out of range, choices that alone do not fit) is one error naming
the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

from glm_jax.evaluation.task_config import TaskError


@dataclasses.dataclass(frozen=True)
class ChoiceSample:
    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    label: int


def _ids(item: dict, key: str, encode: Callable[[str], Sequence[int]], where: str, *, many: bool):
    """``item[key]`` (ids) or ``item[key + "_pretokenized"]`` tokenized; a list of them if ``many``."""
    if key in item:
        value = item[key]
        ok = (isinstance(value, list) and all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
              if many else isinstance(value, list) and all(isinstance(t, int) for t in value))
        if not ok:
            raise TaskError(f"{where}: {key} must be {'a list of id lists' if many else 'a list of ids'}")
        return [tuple(v) for v in value] if many else tuple(value)
    raw_key = key + "_pretokenized"
    if raw_key not in item:
        raise TaskError(f"{where}: no {raw_key} (or {key})")
    value = item[raw_key]
    if many:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise TaskError(f"{where}: {raw_key} must be a non-empty list of strings")
        return [tuple(int(t) for t in encode(v)) for v in value]
    if not isinstance(value, str):
        raise TaskError(f"{where}: {raw_key} must be a string")
    return tuple(int(t) for t in encode(value))


def read_choice_file(path: str, encode: Callable[[str], Sequence[int]], max_seq_length: int,
                     counts: dict) -> list[ChoiceSample]:
    """The multiple-choice samples of one file; ``counts['cut_contexts']`` gains the number of
    contexts cut from the left to fit."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except ValueError as e:
                raise TaskError(f"{where}: not JSON ({e})") from None
            if not isinstance(item, dict):
                raise TaskError(f"{where}: expected a JSON object")
            context = _ids(item, "inputs", encode, where, many=False)
            choices = _ids(item, "choices", encode, where, many=True)
            if not choices or any(len(c) == 0 for c in choices):
                raise TaskError(f"{where}: every choice needs at least one token")
            label = item.get("label")
            if not isinstance(label, int) or isinstance(label, bool):
                raise TaskError(f"{where}: label={label!r}; expected the index of the right choice")
            if not 0 <= label < len(choices):
                raise TaskError(f"{where}: label {label} is out of range for {len(choices)} choices")
            # The authors' budget: every choice's tokens (one <sop> for single-token choices), the mask, <sop>.
            target = 1 if all(len(c) == 1 for c in choices) else sum(len(c) for c in choices)
            if target + 2 > max_seq_length:
                raise TaskError(f"{where}: the choices alone take {target} tokens, more than max_seq_length "
                                f"{max_seq_length} allows")
            if len(context) + target + 2 > max_seq_length:
                context = context[len(context) - (max_seq_length - target - 2):]
                counts["cut_contexts"] = counts.get("cut_contexts", 0) + 1
            out.append(ChoiceSample(context, tuple(choices), label))
    if not out:
        raise TaskError(f"{path}: no samples")
    return out
