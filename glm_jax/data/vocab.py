"""GLM's vocabulary: a SentencePiece model plus GLM's special tokens at the model's ids.

Ordinary text goes through SentencePiece; ``model id = piece id - id_offset``. The
special tokens (``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``<sop>``, ``<eop>`` ...) sit at the
ids the model config names:

* ChatGLM-6B's ``ice_text.model`` holds the specials as pieces and 20000 image tokens in
  front (``id_offset=20000`` for the current vocabulary, 0 for the legacy one); each
  special piece found in the model must land on the config's id, or loading fails.
* A model trained by ``python -m glm_jax.data.build_vocab`` has only ordinary pieces;
  the specials are appended after them, at the config's ids.

Nothing is downloaded: the default vocabulary is trained here on the default corpus and
cached (``default_vocabulary_path``).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm

from glm_jax.config import ConfigError, ModelConfig
from glm_jax.errors import one_line
from glm_jax.data import build_vocab, corpus

# TensorFlow and seqio are imported inside the functions that use them: they take seconds to
# import, and config checks, the synthetic mixture and the jax-only tools never need them.

SPECIAL_PIECES = {
    "mask_token_id": "[MASK]",
    "gmask_token_id": "[gMASK]",
    "smask_token_id": "[sMASK]",
    "sop_token_id": "<sop>",
    "eop_token_id": "<eop>",
    "eod_token_id": "<eod>",
}
MAX_BLANK = 80  # ChatGLM-6B's longest <|blank_N|>
SENTENCE_END = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…")


def _seqio():
    import seqio

    return seqio


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    """A SentencePiece model, or ConfigError naming the file when it is not one."""
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"{path} is not a SentencePiece model ({one_line(e)})") from None


class GLMVocabulary:
    """Text <-> model ids for one model config. Also a ``seqio.Vocabulary`` via ``.seqio()``."""

    def __init__(self, sp_model_path: str, cfg: ModelConfig, id_offset: int = 0):
        if not os.path.exists(sp_model_path):
            raise ConfigError(f"vocabulary file not found: {sp_model_path}")
        self.path = sp_model_path
        self._seqio = None
        self.cfg = cfg
        self.id_offset = id_offset
        self.sp = load_sentencepiece(sp_model_path)
        n_pieces = self.sp.get_piece_size()
        self.text_size = n_pieces - id_offset  # model ids [0, text_size) are SentencePiece pieces
        self.special: dict[int, str] = {}
        for field, piece in SPECIAL_PIECES.items():
            mid = getattr(cfg, field)
            pid = self.sp.piece_to_id(piece)
            if pid != self.sp.unk_id() and self.sp.id_to_piece(pid) == piece:
                if pid - id_offset != mid:
                    raise ConfigError(
                        f"vocabulary {sp_model_path}: {piece} is model id {pid - id_offset} (piece {pid} - offset "
                        f"{id_offset}) but model.{field}={mid}"
                    )
            elif mid < self.text_size:
                raise ConfigError(
                    f"vocabulary {sp_model_path}: model.{field}={mid} falls on the ordinary piece "
                    f"'{self.sp.id_to_piece(mid + id_offset)}'; special ids must be >= {self.text_size} for this vocabulary"
                )
            self.special[mid] = piece
        # ChatGLM-6B's ice_text.model has pieces for newlines, tabs and runs of spaces, and its
        # tokenizer spells text with them before SentencePiece sees it (its _preprocess).
        self.spells_whitespace = all(
            self.sp.piece_to_id(p) != self.sp.unk_id() for p in ("<n>", "<|tab|>", "<|blank_2|>"))
        if self.text_size > cfg.vocab_size:
            raise ConfigError(
                f"vocabulary {sp_model_path} has {self.text_size} text ids but model.vocab_size={cfg.vocab_size}"
            )

    # -- numpy / python side -------------------------------------------------
    def spell(self, text: str) -> str:
        """Text as this vocabulary's tokenizer hands it to SentencePiece: for ChatGLM-6B's,
        newlines, tabs and runs of 2..80 spaces as the pieces ``<n>``, ``<|tab|>``,
        ``<|blank_N|>``; unchanged otherwise. Every reader of text applies it first."""
        if not self.spells_whitespace:
            return text
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def unspell(self, text: str) -> str:
        """The inverse of :meth:`spell` on decoded text."""
        if not self.spells_whitespace:
            return text
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def encode(self, text: str) -> np.ndarray:
        ids = np.asarray(self.sp.encode(text), np.int64) - self.id_offset
        return ids[ids >= 0].astype(np.int32)  # image tokens (below the offset) never occur in text

    def piece(self, i: int) -> str:
        if i in self.special:
            return self.special[i]
        if 0 <= i < self.text_size:
            return self.sp.id_to_piece(int(i) + self.id_offset)
        return f"<id {i}>"

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if 0 <= i < self.text_size and i not in self.special:
                run.append(i + self.id_offset)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(self.piece(i))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def sentence_end_table(self) -> np.ndarray:
        """Bool per model id: the piece ends a sentence (for [sMASK] sentence splitting)."""
        table = np.zeros(self.cfg.vocab_size, bool)
        for i in range(self.text_size):
            piece = self.sp.id_to_piece(i + self.id_offset).rstrip("▁")
            table[i] = piece.endswith(SENTENCE_END)
        return table

    # -- tf side ----------------------------------------------------------------
    def seqio(self):
        """The text part as a seqio vocabulary (for seqio's tokenize preprocessor)."""
        return _seqio().SentencePieceVocabulary(self.path)

    def encode_tf(self, text):
        """A string -> ids, or a block of strings -> ragged ids (image ids below the offset dropped)."""
        import tensorflow as tf

        if self._seqio is None:
            self._seqio = self.seqio()
        ids = self._seqio.encode_tf(text)
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.with_flat_values(tf.cast(ids.flat_values, tf.int32) - self.id_offset)
            return tf.ragged.boolean_mask(ids, ids >= 0)
        ids = tf.cast(ids, tf.int32) - self.id_offset
        return tf.boolean_mask(ids, ids >= 0)


def default_vocabulary_path(cfg: ModelConfig) -> str:
    """A SentencePiece model trained on the default corpus, sized to end below the first
    special id (so the specials append after it); trained once and cached."""
    size = min([getattr(cfg, f) for f in SPECIAL_PIECES] + [cfg.vocab_size])
    if size < 100:
        raise ConfigError(f"the default vocabulary needs the special ids >= 100, got a first special id of {size}")
    size = min(size, 8000)  # the corpus is small; larger vocabularies learn nothing more
    paths = corpus.build()
    out = os.path.join(corpus.cache_dir(), f"{os.path.basename(paths['train'])[:-4]}-sp{size}.model")
    if not os.path.exists(out):
        build_vocab.train([paths["train"]], size, out, escaped=True)
    return out


def load_vocabulary(cfg: ModelConfig, path: Optional[str] = None, id_offset: int = 0) -> GLMVocabulary:
    return GLMVocabulary(path or default_vocabulary_path(cfg), cfg, id_offset)
