"""Beam search as GLM-130B's evaluation runs it (its ``BeamSearchStrategy`` with
``deterministic=True`` and ``consider_end=True``), as a compiled step for the decoding loop.

Each step, for every example:

1. Logits (float32) of the tokens it may not produce become -65504, the authors' value:
   ``banned_tokens`` always; the stop tokens while fewer than ``min_gen_length`` tokens
   are generated; a token that would repeat an n-gram (``no_repeat_ngram_size`` n: the
   last n-1 tokens followed by it already occur in the sequence, ending in a generated
   token); the last token of a ``banned_prefixes`` entry when the tokens generated so
   far are the rest of it (LAMBADA's rule: no answer starts with punctuation).
2. A candidate's score is its beam's score plus the token's log-softmax. The best
   ``C = (max(1, #stop tokens) + 1) * num_beams`` candidates, best first (only the first
   beam's at the first step, when all beams are the prompt), are taken in order: a stop
   token ends a hypothesis, kept among the example's ``num_beams`` best finished ones by
   its score divided by the length penalty ``((5 + length) / 6) ** length_penalty``
   (length: the context length plus the generated tokens, the stop token included); any
   other token continues a beam, until ``num_beams`` beams continue (the candidates after
   that are dropped, stop tokens included). C is large enough that ``num_beams``
   continue whenever the vocabulary allows; where it does not (a vocabulary smaller than
   the beam), the remaining beams are empty (score -inf).
3. An example is done when it holds ``num_beams`` finished hypotheses and the worst of
   them scores at least the best continuing beam's score divided by the penalty of the
   current length.

The loop stops when every example is done or ``max_new_tokens`` are generated; the
beams still running in an example that is not done then join its finished hypotheses
(by the same penalized score). The result is each example's hypotheses, best first, and
the first is the answer.

The KV cache is computed once per prompt (the prefill runs on one row per example) and
copied to the example's beams after the first step; each step reorders the cache rows
after the beams' parents, as the authors reorder their memories.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import ConfigError

BANNED = -65504.0  # the authors' value for a forbidden logit (the float16 minimum)


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """The settings of a beam search (the authors' task-file keys, and their banned lists)."""

    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off
    min_gen_length: int = 0
    banned_tokens: tuple[int, ...] = ()
    banned_prefixes: tuple[tuple[int, ...], ...] = ()

    def validate(self, vocab_size: int) -> "BeamSearch":
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.min_gen_length < 0:
            raise ConfigError(f"min_gen_length must be >= 0, got {self.min_gen_length}")
        bad = [t for t in self.banned_tokens + tuple(t for p in self.banned_prefixes for t in p) if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"banned token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if any(len(p) == 0 for p in self.banned_prefixes):
            raise ConfigError("an empty banned prefix")
        return dataclasses.replace(self, banned_tokens=tuple(int(t) for t in self.banned_tokens),
                                   banned_prefixes=tuple(tuple(int(t) for t in p) for p in self.banned_prefixes))


def penalty(length, length_penalty: float):
    """The authors' length penalty (OpenNMT's): ``((5 + length) / 6) ** length_penalty``."""
    return ((5.0 + length) / 6.0) ** length_penalty


@flax.struct.dataclass
class Finished:
    """Each example's best finished hypotheses, best first."""

    tokens: jax.Array  # [b, k, G] generated tokens (stop token included), pad after
    length: jax.Array  # [b, k] how many of them
    score: jax.Array  # [b, k] penalized score; -inf: no hypothesis yet


def no_finished(b: int, k: int, gen: int, pad: int) -> Finished:
    return Finished(tokens=jnp.full((b, k, gen), pad, jnp.int32), length=jnp.zeros((b, k), jnp.int32),
                    score=jnp.full((b, k), -jnp.inf, jnp.float32))


def _ngram_bans(tokens: jax.Array, t: jax.Array, first_gen: int, start: jax.Array, n: int, vocab: int) -> jax.Array:
    """``[R, V]``: tokens that would repeat an n-gram ending in a generated token.

    tokens ``[R, S]`` with slots ``[first_gen, t)`` generated and ``[start, t)`` real."""
    rows, slots = tokens.shape
    s = jnp.arange(slots)[None, :]
    hit = (s >= first_gen) & (s < t) & (s - (n - 1) >= start[:, None])
    for m in range(1, n):  # the m-th token before slot s against the m-th before slot t
        before = jnp.pad(tokens, ((0, 0), (m, 0)), constant_values=-1)[:, :slots]
        last = jax.lax.dynamic_slice_in_dim(tokens, t - m, 1, axis=1)
        hit = hit & (before == last)
    banned = jnp.zeros((rows, vocab), bool)
    return banned.at[jnp.arange(rows)[:, None], tokens].max(hit)


def _prefix_bans(tokens: jax.Array, t: jax.Array, generated: jax.Array, prefixes, vocab: int) -> jax.Array:
    """``[R, V]``: the last token of each banned prefix whose other tokens are exactly what
    has been generated."""
    rows = tokens.shape[0]
    banned = jnp.zeros((rows, vocab), bool)
    for p in prefixes:
        hit = jnp.broadcast_to(generated == len(p) - 1, (rows,))
        for m, tok in enumerate(p[:-1]):
            hit = hit & (jax.lax.dynamic_slice_in_dim(tokens, t - (len(p) - 1) + m, 1, axis=1)[:, 0] == tok)
        banned = banned.at[:, p[-1]].max(hit)
    return banned


def constrain(logits: jax.Array, tokens: jax.Array, t: jax.Array, first_gen: int, start: jax.Array,
              stops: jax.Array, beams: BeamSearch) -> jax.Array:
    """Step 1 of the module doc: ``[R, V]`` float32 logits with forbidden tokens at -65504."""
    vocab = logits.shape[-1]
    generated = t - first_gen
    banned = jnp.zeros(logits.shape, bool)
    if beams.banned_tokens:
        banned = banned.at[:, jnp.asarray(beams.banned_tokens)].set(True)
    if beams.min_gen_length:
        banned = banned | ((generated < beams.min_gen_length) & jnp.isin(jnp.arange(vocab), stops))[None, :]
    if beams.no_repeat_ngram_size:
        banned = banned | _ngram_bans(tokens, t, first_gen, start, beams.no_repeat_ngram_size, vocab)
    if beams.banned_prefixes:
        banned = banned | _prefix_bans(tokens, t, generated, beams.banned_prefixes, vocab)
    return jnp.where(banned, jnp.float32(BANNED), logits.astype(jnp.float32))


def step(logits: jax.Array, scores: jax.Array, generated_tokens: jax.Array, generated: jax.Array,
         context_len: jax.Array, done: jax.Array, finished: Finished, stops: jax.Array, beams: BeamSearch):
    """Steps 2-3 of the module doc for ``b`` examples of ``k_in`` beams each.

    logits ``[b * k_in, V]`` (constrained); scores ``[b, k_in]``; generated_tokens
    ``[b * k_in, G]`` the beams' tokens so far (``generated`` of them); context_len ``[b]``
    the length the penalty counts before the first new token.

    Returns ``(rows [b * k] the parent row of each new beam, tokens [b * k] its new token,
    scores [b, k], done [b], finished)``.
    """
    b, k_in = scores.shape
    k = beams.num_beams
    vocab = logits.shape[-1]
    total = scores[:, :, None] + jax.nn.log_softmax(logits, axis=-1).reshape(b, k_in, vocab)
    n_cand = min((max(1, stops.shape[0]) + 1) * k, k_in * vocab)
    value, flat = jax.lax.top_k(total.reshape(b, k_in * vocab), n_cand)  # best first
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    ends = jnp.isin(token, stops) & ~done[:, None]
    live = ~ends & (value > -jnp.inf)
    rank = jnp.cumsum(live, axis=1) - 1
    taken = live & (rank < k)
    # The scan stops at the first candidate past the k-th continuing one.
    cut = jnp.where(jnp.any(live & (rank == k), axis=1), jnp.argmax(live & (rank == k), axis=1), n_cand)
    ends = ends & (jnp.arange(n_cand)[None, :] < cut[:, None])

    # Continuing beams, in candidate order.
    slot = taken[:, None, :] & (rank[:, None, :] == jnp.arange(k)[None, :, None])  # [b, k, C]
    exists = jnp.any(slot, axis=2)
    pick = jnp.argmax(slot, axis=2)
    new_scores = jnp.where(exists, jnp.take_along_axis(value, pick, 1), -jnp.inf)
    new_parent = jnp.where(exists, jnp.take_along_axis(parent, pick, 1), 0)
    new_token = jnp.where(exists, jnp.take_along_axis(token, pick, 1), 0)
    rows = (jnp.arange(b)[:, None] * k_in + new_parent).reshape(-1)

    # Finished hypotheses: merge this step's with the kept ones (new first among equals).
    length = context_len + generated + 1
    pen = penalty(length.astype(jnp.float32), beams.length_penalty)
    cand_rows = jnp.arange(b)[:, None] * k_in + parent  # [b, C]
    cand_tokens = generated_tokens[cand_rows]  # [b, C, G]
    cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, token[:, :, None], generated, axis=2)
    all_scores = jnp.concatenate([jnp.where(ends, value / pen[:, None], -jnp.inf), finished.score], axis=1)
    all_tokens = jnp.concatenate([cand_tokens, finished.tokens], axis=1)
    all_length = jnp.concatenate([jnp.broadcast_to(generated + 1, ends.shape).astype(jnp.int32), finished.length], axis=1)
    order = jnp.argsort(-all_scores, axis=1, stable=True)[:, :k]
    kept = Finished(tokens=jnp.take_along_axis(all_tokens, order[:, :, None], 1),
                    length=jnp.take_along_axis(all_length, order, 1),
                    score=jnp.take_along_axis(all_scores, order, 1))
    # A done example keeps what it had (the authors stop adding to it).
    finished = jax.tree.map(lambda new, old: jnp.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
                            kept, finished)
    full = jnp.all(jnp.isfinite(finished.score), axis=1)
    done = done | (full & (finished.score[:, -1] >= jnp.max(new_scores, axis=1) / pen))
    return rows, new_token.reshape(-1), new_scores, done, finished


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, without the stop token that ended it
    score: float  # sum of log-probabilities / length penalty
    stop: Optional[int] = None  # the stop token that ended it; None: it ran out of tokens


def finalize(finished: dict, scores: np.ndarray, generated: np.ndarray, n_generated: int, done: np.ndarray,
             context_len: np.ndarray, stops: Sequence[int], beams: BeamSearch) -> list[list[Hypothesis]]:
    """Each example's hypotheses, best first: the finished ones, and where the example is
    not done its running beams too (the authors' ``consider_end``), inserted as their
    ``_add_end_beams`` does (before equal scores, then the best ``num_beams`` kept)."""
    out = []
    k = beams.num_beams
    stop_set = set(int(s) for s in stops)
    for i in range(scores.shape[0]):
        hyps = [(float(s), tuple(int(t) for t in toks[:n]))
                for s, toks, n in zip(finished["score"][i], finished["tokens"][i], finished["length"][i]) if np.isfinite(s)]
        if not done[i]:
            pen = penalty(float(context_len[i] + n_generated), beams.length_penalty)
            for j in range(scores.shape[1]):
                if not np.isfinite(scores[i, j]):
                    continue
                score = float(scores[i, j]) / pen
                at = len(hyps)
                while at > 0 and not score < hyps[at - 1][0]:
                    at -= 1
                hyps.insert(at, (score, tuple(int(t) for t in generated[i, j, :n_generated])))
                hyps = hyps[:k]
        out.append([Hypothesis(tokens=toks[:-1], score=s, stop=toks[-1]) if toks and toks[-1] in stop_set
                    else Hypothesis(tokens=toks, score=s) for s, toks in hyps])
    return out
