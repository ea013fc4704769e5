"""GLM's autoregressive blank infilling (GLM_SPEC §3.2, §3.3), one example at a time in numpy.

Given a token sequence and a seeded generator, build one GLM sample:

    Part A = the text with each span replaced by one mask token
    Part B = for each span, in random order: input ``<sop> + span``, targets ``span + <eop>``

and the GLM positions: ``position`` is the index in Part A (every Part B token of a span
takes its mask token's index); ``block_position`` is 0 on Part A and 1, 2, ... inside
each span (``<sop>`` = 1). Models with 1D positions (GLM-130B) use the reduction of
GLM_SPEC §1.6: plain ``arange`` for ``[gMASK]`` samples, the ``position`` row otherwise.

Objectives:
  * ``mask``  ([MASK]) — span lengths from Poisson(3) restricted to 1..39, drawn until
    15% of the tokens, placed at random with at least one kept token between spans;
  * ``smask`` ([sMASK]) — whole sentences, shuffled, taken until >= 15% of the tokens;
  * ``gmask`` ([gMASK]) — one trailing span of length uniform in [r*n, n].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

MAX_SPAN = 39
POISSON_LAMBDA = 3.0


def _span_length_pmf() -> np.ndarray:
    k = np.arange(1, MAX_SPAN + 1)
    log_pmf = k * math.log(POISSON_LAMBDA) - POISSON_LAMBDA - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


SPAN_LENGTH_PMF = _span_length_pmf()
_SPAN_LENGTH_CDF = np.cumsum(SPAN_LENGTH_PMF)
_SPAN_LENGTH_CDF[-1] = 1.0
SPAN_LENGTH_MEAN = float((np.arange(1, MAX_SPAN + 1) * SPAN_LENGTH_PMF).sum())


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int

    @classmethod
    def from_model(cls, cfg) -> "SpecialIds":
        return cls(
            mask=cfg.mask_token_id,
            smask=cfg.smask_token_id,
            gmask=cfg.gmask_token_id,
            sop=cfg.sop_token_id,
            eop=cfg.eop_token_id,
            pad=cfg.pad_token_id,
        )


@dataclasses.dataclass
class Sample:
    """One GLM example (unpadded). All arrays have the same length."""

    tokens: np.ndarray  # int32, Part A then Part B
    targets: np.ndarray  # int32, next token on Part B (Part A holds its own tokens, weight 0)
    loss_weights: np.ndarray  # float32, 1 exactly on Part B
    positions: np.ndarray  # int32
    block_positions: np.ndarray  # int32
    prefix_len: int  # length of Part A
    spans: list[tuple[int, int]]  # (start, end) in the original text, in Part B order
    objective: str


def mask_count(n: int, ratio: float, rng: np.random.Generator) -> int:
    """Tokens to blank out: ratio*n with randomised rounding (exact in expectation), >= 1."""
    k = int(math.floor(ratio * n + rng.random()))
    return min(n, max(1, k))


def sample_span_lengths(total: int, rng: np.random.Generator) -> list[int]:
    """Poisson(3) lengths over 1..39 until they reach ``total``; the last is cut to hit it exactly."""
    if total <= 0:
        return []
    # Each length is >= 1, so ``total`` draws always suffice; draw them at once.
    draws = np.searchsorted(_SPAN_LENGTH_CDF, rng.random(total), side="right") + 1
    ends = np.cumsum(draws)
    k = int(np.searchsorted(ends, total)) + 1  # first prefix that reaches total
    lengths = draws[:k].tolist()
    lengths[-1] -= int(ends[k - 1]) - total
    return lengths


def place_spans(lengths: list[int], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random non-adjacent placement (at least one kept token between spans), in text order.

    Spans that cannot fit with their gaps are dropped from the end of ``lengths``.
    """
    lengths = list(lengths)
    while lengths and sum(lengths) + len(lengths) - 1 > n:
        lengths.pop()
    if not lengths:
        return []
    order = rng.permutation(len(lengths))
    lengths = [lengths[i] for i in order]
    free = n - sum(lengths) - (len(lengths) - 1)  # kept tokens not needed as separators
    places = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, offset = [], 0
    for place, length in zip(places, lengths):
        start = offset + int(place)
        spans.append((start, start + length))
        offset += length + 1
    return spans


def sentence_spans(
    tokens: np.ndarray, ends_sentence: np.ndarray, ratio: float, rng: np.random.Generator, budget: int
) -> list[tuple[int, int]]:
    """Whole sentences (runs ending at a sentence-final token), shuffled, until >= ratio*n.

    ``budget`` caps the output growth (2 tokens per chosen sentence) so the sample fits.
    """
    n = len(tokens)
    ends = np.flatnonzero(ends_sentence[np.clip(tokens, 0, len(ends_sentence) - 1)])
    bounds = [0] + [int(e) + 1 for e in ends if e + 1 < n] + [n]
    sentences = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    target = max(1, int(math.ceil(ratio * n)))
    chosen, covered = [], 0
    for i in rng.permutation(len(sentences)):
        if covered >= target or 2 * (len(chosen) + 1) > budget:
            break
        chosen.append(sentences[i])
        covered += sentences[i][1] - sentences[i][0]
    return sorted(chosen)


def build(
    text: np.ndarray,
    spans: list[tuple[int, int]],
    mask_id: int,
    ids: SpecialIds,
    rng: Optional[np.random.Generator],
    objective: str,
) -> Sample:
    """Lay out Part A / Part B for ``spans`` (text order); Part B order is shuffled by ``rng``."""
    text = np.asarray(text, np.int32)
    a_tokens, a_pos_of_span = [], []
    cursor = 0
    for start, end in spans:
        a_tokens.extend(text[cursor:start].tolist())
        a_pos_of_span.append(len(a_tokens))
        a_tokens.append(mask_id)
        cursor = end
    a_tokens.extend(text[cursor:].tolist())
    n_a = len(a_tokens)

    order = list(range(len(spans)))
    if rng is not None and len(order) > 1:
        order = [int(i) for i in rng.permutation(len(order))]
    tokens, targets = list(a_tokens), list(a_tokens)
    positions = list(range(n_a))
    blocks = [0] * n_a
    for i in order:
        start, end = spans[i]
        span = text[start:end].tolist()
        tokens.extend([ids.sop] + span)
        targets.extend(span + [ids.eop])
        positions.extend([a_pos_of_span[i]] * (len(span) + 1))
        blocks.extend(range(1, len(span) + 2))
    weights = np.zeros(len(tokens), np.float32)
    weights[n_a:] = 1.0
    return Sample(
        tokens=np.asarray(tokens, np.int32),
        targets=np.asarray(targets, np.int32),
        loss_weights=weights,
        positions=np.asarray(positions, np.int32),
        block_positions=np.asarray(blocks, np.int32),
        prefix_len=n_a,
        spans=[spans[i] for i in order],
        objective=objective,
    )


def mask_sample(text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, ratio: float = 0.15) -> Sample:
    n = len(text)
    lengths = sample_span_lengths(mask_count(n, ratio, rng), rng)
    return build(text, place_spans(lengths, n, rng), ids.mask, ids, rng, "mask")


def smask_sample(
    text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, ends_sentence: np.ndarray, ratio: float = 0.15, budget: int = 1 << 30
) -> Sample:
    spans = sentence_spans(np.asarray(text), ends_sentence, ratio, rng, budget)
    return build(text, spans, ids.smask, ids, rng, "smask")


def gmask_sample(text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, min_ratio: float = 0.2) -> Sample:
    """One trailing span of length uniform in [max(1, floor(r*n)), n]."""
    n = len(text)
    lo = min(n, max(1, int(min_ratio * n)))
    length = int(rng.integers(lo, n + 1))
    return build(text, [(n - length, n)], ids.gmask, ids, None, "gmask")


def prompt_sample(prompt: np.ndarray, response: np.ndarray, ids: SpecialIds) -> Sample:
    """An instruction pair: Part A ``prompt [gMASK]``, Part B ``<sop> response``."""
    text = np.concatenate([np.asarray(prompt, np.int32), np.asarray(response, np.int32)])
    return build(text, [(len(prompt), len(text))], ids.gmask, ids, None, "gmask")


def positions_1d(sample: Sample) -> np.ndarray:
    """GLM-130B's 1D positions (GLM_SPEC §1.6): arange for [gMASK], the position row otherwise."""
    if sample.objective == "gmask":
        return np.arange(len(sample.tokens), dtype=np.int32)
    return sample.positions


def restore(sample: Sample, mask_ids: tuple[int, ...]) -> np.ndarray:
    """Put each Part B span back in place of its mask token: the original text."""
    a = sample.tokens[: sample.prefix_len]
    b_tokens = sample.tokens[sample.prefix_len :]
    b_blocks = sample.block_positions[sample.prefix_len :]
    b_pos = sample.positions[sample.prefix_len :]
    starts = np.flatnonzero(b_blocks == 1)
    spans = {}
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(b_tokens)
        spans[int(b_pos[s])] = b_tokens[s + 1 : e]
    out = []
    for i, tok in enumerate(a.tolist()):
        if i in spans and tok in mask_ids:
            out.extend(spans[i].tolist())
        else:
            out.append(tok)
    return np.asarray(out, np.int32)
