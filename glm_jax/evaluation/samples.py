"""Reading a task's data files in GLM-130B's evaluation format.

Multiple-choice and generation files are JSON lines: an object with
``inputs_pretokenized`` (text) or ``inputs`` (model ids), and for a multiple-choice task
``choices_pretokenized`` (a list of texts) or ``choices`` (a list of id lists) and
``label`` (the index of the right choice); for a generation task
``targets_pretokenized`` (a text, or a list of acceptable texts) or ``targets`` (a list
of id lists). Text is tokenized with the model's vocabulary, each choice and target on
its own, as the authors' ``get_tokenized_input`` does. A language-modelling file is plain
text, tokenized whole.

As the authors' datasets do, a context too long for ``max_seq_length`` with its choices
(or with ``max_gen_length`` new tokens) is cut from the left (and counted); anything else
wrong with a line (not JSON, a missing or mistyped field, a label out of range, choices
that alone do not fit) is one error naming the file and the line.
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


@dataclasses.dataclass(frozen=True)
class GenerationSample:
    context: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]  # the acceptable answers (any one counts)


@dataclasses.dataclass(frozen=True)
class Document:
    """A language-modelling file: its tokens and its word count (the perplexity's divisor)."""

    tokens: tuple[int, ...]
    words: int


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


def _lines(path: str):
    """(where, item) for each non-empty JSON line of ``path``."""
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
            yield where, item


def _targets(item: dict, encode, where: str) -> tuple[tuple[int, ...], ...]:
    if "targets" in item:
        return tuple(_ids(item, "targets", encode, where, many=True))
    raw = item.get("targets_pretokenized")
    if isinstance(raw, str):  # one answer
        return (tuple(int(t) for t in encode(raw)),)
    return tuple(_ids(item, "targets", encode, where, many=True))


def read_generation_file(path: str, encode: Callable[[str], Sequence[int]], max_seq_length: int, max_gen_length: int,
                         counts: dict) -> list[GenerationSample]:
    """The generation samples of one file; a context longer than ``max_seq_length -
    max_gen_length - 2`` (room for the mask, ``<sop>`` and the answer) keeps its end."""
    room = max_seq_length - max_gen_length - 2
    if room < 1:
        raise TaskError(f"{path}: max_gen_length {max_gen_length} leaves no room for a context in max_seq_length "
                        f"{max_seq_length}")
    out = []
    for where, item in _lines(path):
        context = _ids(item, "inputs", encode, where, many=False)
        if not context:
            raise TaskError(f"{where}: the input is empty")
        if len(context) > room:
            context = context[len(context) - room:]
            counts["cut_contexts"] = counts.get("cut_contexts", 0) + 1
        out.append(GenerationSample(context, _targets(item, encode, where)))
    if not out:
        raise TaskError(f"{path}: no samples")
    return out


def read_document(path: str, encode: Callable[[str], Sequence[int]]) -> Document:
    """A language-modelling file: the whole text tokenized, and its words counted as the
    authors count them (``len(text.strip().split(" "))``)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from None
    tokens = tuple(int(t) for t in encode(raw))
    if not tokens:
        raise TaskError(f"{path}: no text")
    return Document(tokens, len(raw.strip().split(" ")))


def read_choice_file(path: str, encode: Callable[[str], Sequence[int]], max_seq_length: int,
                     counts: dict) -> list[ChoiceSample]:
    """The multiple-choice samples of one file; ``counts['cut_contexts']`` gains the number of
    contexts cut from the left to fit."""
    out = []
    for where, item in _lines(path):
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
