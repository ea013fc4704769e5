"""GLM feature converter: task examples -> fixed-length model rows, packed or padded.

In the spirit of seqio's ``PrefixLMFeatureConverter``, but the prefix is GLM's Part A
and packing keeps one Part A length per packed segment. Model features (length L):

  tokens, targets, loss_weights, positions, block_positions    [L]   (GLM's block positions: 0 in Part A, 1, 2, ... in each span)
  prefix_len    scalar (padded rows)  or  [L // 2] per segment, entry s-1 for segment s (packed)
  segment_ids   [L], packed only: 1, 2, ... per example, 0 on padding

Packing is greedy and sequential (an example that does not fit closes the row), so rows
are a pure function of the example stream. It runs on numpy examples: seqio's own
packer treats every 0 as padding, which GLM's block ids and loss weights are not.
Examples longer than L are never cut (that would drop Part B targets silently): the
preprocessors size their chunks to fit; any that is still longer is dropped and counted.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import numpy as np

FEATURES = ("tokens", "targets", "loss_weights", "positions", "block_positions")
DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_weights": np.float32, "positions": np.int32, "block_positions": np.int32}


class GLMFeatureConverter:
    def __init__(self, length: int, pack: bool, pad_id: int = 0):
        self.length = length
        self.pack = pack
        self.pad_id = pad_id
        self.max_segments = max(1, length // 2)
        self.stats: collections.Counter = collections.Counter()

    def rows(self, examples: Iterable[dict]) -> Iterator[dict]:
        pending: list[dict] = []
        used = 0
        for ex in examples:
            n = len(ex["tokens"])
            if n > self.length or n == 0:
                self.stats["oversized_examples" if n else "empty_examples"] += 1
                continue
            if not self.pack:
                yield self._row([ex])
                continue
            if pending and (used + n > self.length or len(pending) == self.max_segments):
                yield self._row(pending)
                pending, used = [], 0
            pending.append(ex)
            used += n
        if pending:
            yield self._row(pending)

    def _row(self, exs: list[dict]) -> dict:
        L = self.length
        row = {k: np.zeros(L, DTYPES[k]) for k in FEATURES}
        row["tokens"][:] = self.pad_id
        row["targets"][:] = self.pad_id
        seg = np.zeros(L, np.int32)
        plen = np.zeros(self.max_segments, np.int32)
        at = 0
        for i, ex in enumerate(exs):
            n = len(ex["tokens"])
            for k in FEATURES:
                row[k][at : at + n] = ex[k]
            seg[at : at + n] = i + 1
            plen[i] = int(np.count_nonzero(np.asarray(ex["block_positions"]) == 0))
            at += n
        if self.pack:
            row["segment_ids"] = seg
            row["prefix_len"] = plen
        else:
            row["prefix_len"] = np.int32(plen[0])
        return row


def batch_rows(rows: Iterable[dict], batch_size: int) -> Iterator[dict]:
    buf: list[dict] = []
    for r in rows:
        buf.append(r)
        if len(buf) == batch_size:
            yield {k: np.stack([b[k] for b in buf]) for k in buf[0]}
            buf = []
