"""Conversations as text, the way the authors write them.

Two formats of ChatGLM-6B's multi-round text (round ``i`` is
``[Round i]\\n问：{query}\\n答：{response}\\n``), which differ only in the first round:

* :func:`chat_prompt`: what its ``chat()`` sends the model at inference; a conversation
  without history is just the query.
* :func:`training_prompt`: what its P-tuning trainer (``ptuning/main.py``) trains on;
  with a history field (even an empty one) every prompt is written in rounds, so a first
  question is ``[Round 0]\\n问：{query}\\n答：``; without one, the prompt is the query.

:func:`read_example` turns one JSON line of a chat file into (prompt text, response
text), or says why the line is unusable.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union


def _rounds(history: Sequence[Sequence[str]]) -> str:
    return "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))


def chat_prompt(history: Sequence[tuple[str, str]], query: str) -> str:
    """ChatGLM-6B's ``chat()`` prompt for ``query`` after the (query, response) rounds."""
    if not history:
        return query
    return _rounds(history) + f"[Round {len(history)}]\n问：{query}\n答："


def training_prompt(query: str, history: Optional[Sequence[Sequence[str]]]) -> str:
    """The prompt ChatGLM-6B's fine-tuning builds: ``history`` None when the data has no
    history field (the prompt is the query), else the rounds and ``[Round n]`` for the query."""
    if history is None:
        return query
    return _rounds(history) + f"[Round {len(history)}]\n问：{query}\n答："


def read_example(obj: object, prompt_field: str, response_field: str,
                 history_field: str) -> Union[tuple[str, str], str]:
    """(prompt text, response text) of one parsed JSON line, or the reason it is skipped:
    ``"unreadable_documents"`` (not an object, a field missing or of the wrong type) or
    ``"empty_documents"`` (an empty prompt or response: the authors skip those too).
    ``history_field`` empty: the data has no history."""
    if not isinstance(obj, dict):
        return "unreadable_documents"
    query, response = obj.get(prompt_field), obj.get(response_field)
    if not isinstance(query, str) or not isinstance(response, str):
        return "unreadable_documents"
    history = obj.get(history_field) if history_field else None
    if history is not None:
        ok = isinstance(history, list) and all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history)
        if not ok:
            return "unreadable_documents"
    if not query or not response:
        return "empty_documents"
    return training_prompt(query, history), response
