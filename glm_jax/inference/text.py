"""Text <-> prompt ids for generation, the way the authors build their prompts.

* ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` written in the text become those tokens; the text
  between them is encoded by the vocabulary (GLM-130B's ``fill_blanks`` does the same).
* A text with no mask token gets ``[gMASK]`` appended (GLM-130B; ChatGLM-6B's tokenizer
  always appends ``[gMASK] <sop>``). GLM-130B appends eos after a text whose last mask is
  not at its end; :func:`prompt_ids` then adds ``<sop>``.
* ChatGLM-6B's vocabulary spells whitespace with its own pieces
  (``GLMVocabulary.spell`` / ``unspell``); the chat formats are ``glm_jax.data.chat``.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")


class PromptText:
    """A GLM vocabulary (``glm_jax.data.vocab.GLMVocabulary``) with the prompt conventions."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.cfg = vocab.cfg

    def encode(self, text: str) -> list[int]:
        """Text with mask tokens written as ``[MASK]``/``[sMASK]``/``[gMASK]`` -> ids."""
        cfg = self.cfg
        ids = {"[MASK]": cfg.mask_token_id, "[sMASK]": cfg.smask_token_id, "[gMASK]": cfg.gmask_token_id}
        out: list[int] = []
        pieces = MASK_PATTERN.split(text)
        marks = MASK_PATTERN.findall(text)
        for i, piece in enumerate(pieces):
            if piece:
                out.extend(int(t) for t in self.vocab.encode(self.vocab.spell(piece)))
            if i < len(marks):
                out.append(ids[marks[i]])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocab.unspell(self.vocab.decode([int(i) for i in ids]))

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


def until_stop(ids: np.ndarray, stops: Sequence[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    out = []
    for t in np.asarray(ids).tolist():
        if t in stops:
            break
        out.append(int(t))
    return out
