"""GLM's autoregressive blank infilling (MODEL.md §3.2, §3.3), a block of texts at a time in numpy.

Given token sequences and a seeded generator, build GLM samples:

    Part A = the text with each span replaced by one mask token
    Part B = for each span, in random order: input ``<sop> + span``, targets ``span + <eop>``

and the GLM positions: ``position`` is the index in Part A (every Part B token of a span
takes its mask token's index); ``block_position`` is 0 on Part A and 1, 2, ... inside
each span (``<sop>`` = 1). Models with 1D positions (GLM-130B) use the reduction of
MODEL.md §1.6: plain ``arange`` for ``[gMASK]`` samples, the ``position`` row otherwise.

Objectives:
  * ``mask``  ([MASK]) — span lengths from Poisson(3) restricted to 1..39, drawn until
    15% of the tokens, placed at random with at least one kept token between spans;
  * ``smask`` ([sMASK]) — whole sentences, shuffled, taken until >= 15% of the tokens;
  * ``gmask`` ([gMASK]) — one trailing span of length uniform in [r*n, n].

Why blocks: the input pipeline hands over a few hundred texts per numpy call. Building
them one at a time cost ~100 µs of Python per example (a generator, a dozen tiny numpy
calls, list building) and held the GIL against TensorFlow's threads. Here each step is one
numpy operation over all the texts, spans or tokens of a block (``text`` flat, text i =
``text[splits[i]:splits[i + 1]]``), so a block costs about as much as a few examples did.
The single-text functions (``mask_sample`` ...) are blocks of one.
"""

from __future__ import annotations

import dataclasses
import math

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
    def from_model(cls, cfg) -> SpecialIds:
        return cls(
            mask=cfg.mask_token_id,
            smask=cfg.smask_token_id,
            gmask=cfg.gmask_token_id,
            sop=cfg.sop_token_id,
            eop=cfg.eop_token_id,
            pad=cfg.pad_token_id,
        )


# -- ragged helpers --------------------------------------------------------------------
# Groups (the spans of one text, the tokens of one example) are contiguous runs of a
# sorted ``owner`` array; ``counts[i]`` is the size of group i.


def group_starts(counts: np.ndarray) -> np.ndarray:
    """Index of each group's first element (exclusive cumsum)."""
    out = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the loop."""
    lengths = np.asarray(lengths, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - group_starts(lengths), lengths) + np.arange(lengths.sum())


def _index_in_group(owner: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.arange(len(owner)) - group_starts(counts)[owner]


def _cumsum_before(values: np.ndarray, owner: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of the earlier values of the same group (exclusive cumsum within groups)."""
    before = np.cumsum(values) - values
    return before - before[group_starts(counts)[owner]]


def _shuffle_in_groups(owner: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation that keeps every group in place and shuffles its members uniformly."""
    return np.lexsort((rng.random(len(owner)), owner))


# -- spans -----------------------------------------------------------------------------


@dataclasses.dataclass
class Spans:
    """Spans of a block: text ``owner``, ``[start, end)`` within that text, and ``rank``, the
    span's place in its text's Part B. Sorted by owner; non-empty, never overlapping."""

    owner: np.ndarray
    start: np.ndarray
    end: np.ndarray
    rank: np.ndarray

    @classmethod
    def shuffled(cls, owner, start, end, n_texts: int, rng: np.random.Generator) -> Spans:
        """Spans in text order with a uniformly random Part B order per text."""
        rank = np.empty(len(owner), np.int64)
        rank[_shuffle_in_groups(owner, rng)] = _index_in_group(owner, np.bincount(owner, minlength=n_texts))
        return cls(owner, start, end, rank)


def _mask_counts(n: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Tokens to blank out per text: ratio*n with randomised rounding (exact in expectation), >= 1."""
    k = np.floor(ratio * n + rng.random(len(n))).astype(np.int64)
    return np.minimum(n, np.maximum(1, k))


def _span_lengths(totals: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Poisson(3) lengths over 1..39 until they reach each text's total; the last is cut to hit
    it exactly. Each length is >= 1, so ``total`` draws per text always suffice."""
    owner = np.repeat(np.arange(len(totals)), totals)
    draws = np.searchsorted(_SPAN_LENGTH_CDF, rng.random(len(owner)), side="right") + 1
    total = totals[owner]
    before = _cumsum_before(draws, owner, totals)
    keep = before < total  # drawn before the text's total was reached
    lengths = np.minimum(draws, total - before)
    return owner[keep], lengths[keep]


def _fitting(owner: np.ndarray, lengths: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop spans from the end of each text's list until they fit with a kept token between
    each two (only texts too short for their spans lose any)."""
    counts = np.bincount(owner, minlength=len(n))
    needed = _cumsum_before(lengths, owner, counts) + lengths + _index_in_group(owner, counts)
    keep = needed <= n[owner]
    return owner[keep], lengths[keep]


def mask_spans(n: np.ndarray, ratio: float, rng: np.random.Generator) -> Spans:
    """[MASK] spans for texts of lengths ``n``: Poisson lengths until ``ratio`` of each text, in
    random order, at uniformly random places with at least one kept token between spans."""
    n = np.asarray(n, np.int64)
    owner, lengths = _fitting(*_span_lengths(_mask_counts(n, ratio, rng), rng), n)
    counts = np.bincount(owner, minlength=len(n))
    lengths = lengths[_shuffle_in_groups(owner, rng)]  # random text order (the cut length is not always last)
    used = np.bincount(owner, weights=lengths, minlength=len(n)).astype(np.int64) + counts - 1
    # The kept tokens not needed as separators (n - used) are spread over the gaps before the
    # spans: sorted uniform draws from 0..n-used, one per span, as in GLM's placement.
    gaps = rng.integers(0, (n - used)[owner] + 1)
    gaps = gaps[np.lexsort((gaps, owner))]
    start = gaps + _cumsum_before(lengths + 1, owner, counts)
    return Spans.shuffled(owner, start, start + lengths, len(n), rng)


def sentence_spans(text: np.ndarray, splits: np.ndarray, ends_sentence: np.ndarray, ratio: float,
                   rng: np.random.Generator, budget: int) -> Spans:
    """[sMASK] spans: whole sentences (runs ending at a sentence-final token, or at the text's
    end), taken in random order until >= ratio*n tokens of each text.

    ``budget`` caps each text's growth (2 tokens per chosen sentence) so the sample fits.
    """
    n = np.diff(splits)
    text_of = np.repeat(np.arange(len(n)), n)
    first = np.zeros(len(text), bool)
    first[1:] = ends_sentence[np.clip(text[:-1], 0, len(ends_sentence) - 1)]
    first[splits[:-1][n > 0]] = True  # every text starts a sentence
    s_start = np.flatnonzero(first)
    s_end = np.append(s_start[1:], len(text))  # the next sentence, or next text, starts there
    s_owner = text_of[s_start]
    counts = np.bincount(s_owner, minlength=len(n))
    order = _shuffle_in_groups(s_owner, rng)
    covered = _cumsum_before((s_end - s_start)[order], s_owner, counts)
    target = np.maximum(1, np.ceil(ratio * n)).astype(np.int64)
    take = (covered < target[s_owner]) & (2 * (_index_in_group(s_owner, counts) + 1) <= budget)
    chosen = np.sort(order[take])  # text order
    owner = s_owner[chosen]
    base = splits[owner]
    return Spans.shuffled(owner, s_start[chosen] - base, s_end[chosen] - base, len(n), rng)


def gmask_spans(n: np.ndarray, min_ratio: float, rng: np.random.Generator) -> Spans:
    """One trailing span per text, of length uniform in [max(1, floor(r*n)), n]."""
    n = np.asarray(n, np.int64)
    lo = np.minimum(n, np.maximum(1, np.floor(min_ratio * n).astype(np.int64)))
    length = rng.integers(lo, n + 1)
    owner = np.flatnonzero(length > 0)  # empty texts stay empty
    return Spans(owner, n[owner] - length[owner], n[owner], np.zeros(len(owner), np.int64))


# -- layout ----------------------------------------------------------------------------


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


@dataclasses.dataclass
class Block:
    """GLM examples back to back: example i is ``[offsets[i], offsets[i] + lengths[i])`` of
    each flat array; ``spans`` are in Part B order."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_weights: np.ndarray
    positions: np.ndarray
    block_positions: np.ndarray
    lengths: np.ndarray
    prefix_lens: np.ndarray
    spans: Spans
    objective: str

    @property
    def offsets(self) -> np.ndarray:
        return group_starts(self.lengths)

    def positions_1d(self) -> np.ndarray:
        """GLM-130B's 1D positions (MODEL.md §1.6): arange for [gMASK], the position row otherwise."""
        if self.objective != "gmask":
            return self.positions
        return concat_ranges(np.zeros(len(self.lengths)), self.lengths).astype(np.int32)

    def sample(self, i: int) -> Sample:
        a, b = int(self.offsets[i]), int(self.offsets[i] + self.lengths[i])
        lo, hi = np.searchsorted(self.spans.owner, [i, i + 1])
        return Sample(
            tokens=self.tokens[a:b],
            targets=self.targets[a:b],
            loss_weights=self.loss_weights[a:b],
            positions=self.positions[a:b],
            block_positions=self.block_positions[a:b],
            prefix_len=int(self.prefix_lens[i]),
            spans=list(zip(self.spans.start[lo:hi].tolist(), self.spans.end[lo:hi].tolist())),
            objective=self.objective,
        )


def _part_a(text, splits, spans: Spans, mask_id: int):
    """Each text with its spans replaced by ``mask_id``: (tokens, text of each, mask indices)."""
    n = np.diff(splits)
    g_start = splits[spans.owner] + spans.start
    inside = np.cumsum(np.bincount(g_start, minlength=len(text) + 1) - np.bincount(splits[spans.owner] + spans.end, minlength=len(text) + 1))
    is_start = np.zeros(len(text), bool)
    is_start[g_start] = True
    keep = (inside[:-1] == 0) | is_start  # a span leaves one token: its mask
    tokens = np.where(is_start, mask_id, text)[keep]
    owner = np.repeat(np.arange(len(n)), n)[keep]
    counts = np.bincount(spans.owner, minlength=len(n))
    mask_index = spans.start - _cumsum_before(spans.end - spans.start - 1, spans.owner, counts)
    return tokens, np.bincount(owner, minlength=len(n)), mask_index


def layout(text: np.ndarray, splits: np.ndarray, spans: Spans, mask_id: int, ids: SpecialIds, objective: str) -> Block:
    """Lay out Part A / Part B of every text of a block for ``spans`` (text order)."""
    text = np.asarray(text, np.int32)
    splits = np.asarray(splits, np.int64)
    n = np.diff(splits)
    a_tokens, n_a, mask_index = _part_a(text, splits, spans, mask_id)
    counts = np.bincount(spans.owner, minlength=len(n))
    n_b = n - n_a + 2 * counts  # each span, plus <sop>/<eop>, minus its mask token
    order = np.lexsort((spans.rank, spans.owner))
    seg = (spans.end - spans.start + 1)[order]  # <sop> + span
    step = concat_ranges(np.zeros(len(seg)), seg)  # 0 at <sop>
    src = np.repeat((splits[spans.owner] + spans.start)[order], seg) + step  # the target's text index
    last = step == np.repeat(seg - 1, seg)
    lengths = n_a + n_b
    first = group_starts(lengths)
    a_at, b_at = concat_ranges(first, n_a), concat_ranges(first + n_a, n_b)
    tokens = np.empty(lengths.sum(), np.int32)
    targets = np.empty_like(tokens)
    tokens[a_at], targets[a_at] = a_tokens, a_tokens
    tokens[b_at] = np.where(step == 0, ids.sop, text[np.maximum(src - 1, 0)])
    targets[b_at] = np.where(last, ids.eop, text[np.minimum(src, len(text) - 1)])
    weights = np.zeros(len(tokens), np.float32)
    weights[b_at] = 1.0
    positions = np.empty_like(tokens)
    positions[a_at] = concat_ranges(np.zeros(len(n)), n_a)
    positions[b_at] = np.repeat(mask_index[order], seg)
    blocks = np.zeros_like(tokens)
    blocks[b_at] = step + 1
    b_spans = Spans(spans.owner[order], spans.start[order], spans.end[order], spans.rank[order])
    return Block(tokens, targets, weights, positions, blocks, lengths, n_a, b_spans, objective)


# -- objectives ------------------------------------------------------------------------


def mask_block(text, splits, ids: SpecialIds, rng: np.random.Generator, ratio: float = 0.15) -> Block:
    return layout(text, splits, mask_spans(np.diff(splits), ratio, rng), ids.mask, ids, "mask")


def smask_block(text, splits, ids: SpecialIds, rng: np.random.Generator, ends_sentence: np.ndarray,
                ratio: float = 0.15, budget: int = 1 << 30) -> Block:
    text, splits = np.asarray(text, np.int32), np.asarray(splits, np.int64)
    return layout(text, splits, sentence_spans(text, splits, ends_sentence, ratio, rng, budget), ids.smask, ids, "smask")


def gmask_block(text, splits, ids: SpecialIds, rng: np.random.Generator, min_ratio: float = 0.2) -> Block:
    return layout(text, splits, gmask_spans(np.diff(splits), min_ratio, rng), ids.gmask, ids, "gmask")


def prompt_block(text, splits, prompt_lens: np.ndarray, ids: SpecialIds) -> Block:
    """Instruction pairs, each text ``prompt + response``: Part A ``prompt [gMASK]``, Part B
    ``<sop> response``. Texts with an empty response stay empty."""
    n = np.diff(np.asarray(splits, np.int64))
    prompt_lens = np.asarray(prompt_lens, np.int64)
    owner = np.flatnonzero(n > prompt_lens)
    spans = Spans(owner, prompt_lens[owner], n[owner], np.zeros(len(owner), np.int64))
    return layout(text, splits, spans, ids.gmask, ids, "gmask")


def chat_block(prompts, prompt_splits, responses, response_splits, ids: SpecialIds, max_source: int,
               max_target: int) -> tuple[Block, dict[str, int]]:
    """Conversations as the authors fine-tune on them (ChatGLM-6B ``ptuning/main.py``):
    prompt ids cut to their first ``max_source - 1`` and response ids to their first
    ``max_target - 2``, then ``prompt [gMASK] <sop> response <eop>`` with Part A ending at
    ``[gMASK]``. The loss covers ``<sop>`` (predicted at ``[gMASK]``), the response and
    ``<eop>``. The authors also feed ``<eop>`` as the last input token; it predicts
    nothing and, last under the causal mask, changes nothing, so here it is a target only.
    A pair whose response has no tokens stays empty. Also returns counts:
    ``chat_examples``, ``cut_prompts``, ``cut_responses``, ``empty_documents``."""
    p_splits, r_splits = np.asarray(prompt_splits, np.int64), np.asarray(response_splits, np.int64)
    p_n, r_n = np.diff(p_splits), np.diff(r_splits)
    r_len = np.minimum(r_n, max_target - 2)
    p_len = np.where(r_len > 0, np.minimum(p_n, max_source - 1), 0)
    counts = {"chat_examples": int(len(p_n)), "cut_prompts": int(np.sum((p_n > p_len) & (r_len > 0))),
              "cut_responses": int(np.sum(r_n > r_len)), "empty_documents": int(np.sum(r_n == 0))}
    prompts = np.asarray(prompts, np.int32)
    starts = np.stack([p_splits[:-1], r_splits[:-1] + len(prompts)], axis=1).ravel()
    pieces = np.stack([p_len, r_len], axis=1).ravel()
    text = np.concatenate([prompts, np.asarray(responses, np.int32)])[concat_ranges(starts, pieces)]
    block = prompt_block(text, np.concatenate([[0], np.cumsum(p_len + r_len)]), p_len, ids)
    at_gmask = (block.offsets + block.prefix_lens - 1)[block.lengths > 0]
    block.targets[at_gmask] = ids.sop
    block.loss_weights[at_gmask] = 1.0
    return block, counts


def _one(text) -> tuple[np.ndarray, np.ndarray]:
    text = np.asarray(text, np.int32)
    return text, np.array([0, len(text)], np.int64)


def mask_sample(text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, ratio: float = 0.15) -> Sample:
    return mask_block(*_one(text), ids, rng, ratio).sample(0)


def smask_sample(
    text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, ends_sentence: np.ndarray, ratio: float = 0.15, budget: int = 1 << 30
) -> Sample:
    return smask_block(*_one(text), ids, rng, ends_sentence, ratio, budget).sample(0)


def gmask_sample(text: np.ndarray, ids: SpecialIds, rng: np.random.Generator, min_ratio: float = 0.2) -> Sample:
    return gmask_block(*_one(text), ids, rng, min_ratio).sample(0)


def positions_1d(sample: Sample) -> np.ndarray:
    """GLM-130B's 1D positions (MODEL.md §1.6): arange for [gMASK], the position row otherwise."""
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
