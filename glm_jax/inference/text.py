"""Text <-> prompt ids for generation, the way the authors build their prompts.

* ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` written in the text become those tokens; the text
  between them is encoded by the vocabulary (GLM-130B's ``fill_blanks`` does the same).
* A text with no mask token gets ``[gMASK]`` appended (GLM-130B; ChatGLM-6B's tokenizer
  always appends ``[gMASK] <sop>``). GLM-130B appends eos after a text whose last mask is
  not at its end; :func:`prompt_ids` then adds ``<sop>``.
* ChatGLM-6B's vocabulary (``ice_text.model``) spells newlines, tabs and runs of spaces as
  the pieces ``<n>``, ``<|tab|>`` and ``<|blank_N|>`` (its tokenizer's ``_preprocess``);
  when the vocabulary has those pieces, text is mapped onto them and back.
* Chat: ChatGLM-6B's multi-round format (MODEL.md §2.3), round i being
  ``[Round i]\\n问：{query}\\n答：{response}\\n``; a first round is just the query.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")
MAX_BLANK = 80  # ChatGLM-6B's longest <|blank_N|>


class PromptText:
    """A GLM vocabulary (``glm_jax.data.vocab.GLMVocabulary``) with the prompt conventions."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.cfg = vocab.cfg
        sp = vocab.sp
        self.chatglm_spaces = all(
            sp.piece_to_id(p) != sp.unk_id() for p in ("<n>", "<|tab|>", "<|blank_2|>")
        )

    def _pre(self, text: str) -> str:
        if not self.chatglm_spaces:
            return text
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def _post(self, text: str) -> str:
        if not self.chatglm_spaces:
            return text
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def encode(self, text: str) -> list[int]:
        """Text with mask tokens written as ``[MASK]``/``[sMASK]``/``[gMASK]`` -> ids."""
        cfg = self.cfg
        ids = {"[MASK]": cfg.mask_token_id, "[sMASK]": cfg.smask_token_id, "[gMASK]": cfg.gmask_token_id}
        out: list[int] = []
        pieces = MASK_PATTERN.split(text)
        marks = MASK_PATTERN.findall(text)
        for i, piece in enumerate(pieces):
            if piece:
                out.extend(int(t) for t in self.vocab.encode(self._pre(piece)))
            if i < len(marks):
                out.append(ids[marks[i]])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._post(self.vocab.decode([int(i) for i in ids]))

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt the authors build from ``text``, ending in ``<sop>``."""
        return self.blank_row(text) + [self.cfg.sop_token_id]

    def blank_row(self, text: str) -> list[int]:
        """``text`` as a row to fill (no ``<sop>``): GLM-130B's ``[gMASK]`` / eos rules."""
        cfg = self.cfg
        row = self.encode(text)
        if not MASK_PATTERN.search(text):
            row.append(cfg.gmask_token_id)
        elif not text.rstrip().endswith("MASK]"):
            row.append(cfg.eos_token_id)
        return row

    def has_blanks(self, text: str) -> bool:
        """The text asks for blank filling: it has a ``[MASK]`` or ``[sMASK]``."""
        return any(m != "[gMASK]" for m in MASK_PATTERN.findall(text))


def chat_prompt(history: Sequence[tuple[str, str]], query: str) -> str:
    """ChatGLM-6B's ``chat()`` prompt for ``query`` after the (query, response) rounds."""
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def until_stop(ids: np.ndarray, stops: Sequence[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    out = []
    for t in np.asarray(ids).tolist():
        if t in stops:
            break
        out.append(int(t))
    return out
