"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p, after
the repetition penalty, as the authors' ChatGLM-6B ``generate()`` does it (Hugging Face
``transformers`` 4.27: logits processors, then warpers in the order temperature, top-k,
top-p).

* repetition penalty p (CTRL's; ``RepetitionPenaltyLogitsProcessor``): the logit of every
  token already in the sequence, prompt included, becomes ``l * p`` if negative, else ``l / p``;
* temperature T: ``l / T``;
* top-k: logits below the k-th largest are dropped (ties with it stay);
* top-p: sorted by probability, a token stays if the tokens ranked above it hold less
  than p of the mass (so the most likely token always stays).

Sampling draws from the softmax of what is left (``jax.random.categorical``); the key of
step t is ``fold_in(key, t)``, so the tokens drawn do not depend on how the loop is cut
into chunks.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from glm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    greedy: bool = True  # argmax (after the repetition penalty); False samples
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int = 0

    def validate(self) -> "Sampling":
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        return self


# ChatGLM-6B's chat() defaults: do_sample, top_p 0.7, temperature 0.95, and transformers'
# default top_k of 50, which its generate() applies because chat() does not override it.
CHATGLM_CHAT = Sampling(greedy=False, temperature=0.95, top_k=50, top_p=0.7)


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Repetition penalty on ``[b, V]`` float32 logits where ``seen`` ``[b, V]`` is True."""
    if penalty == 1.0:
        return logits
    p = jnp.float32(penalty)
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def warp(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, top-k and top-p on ``[b, V]`` float32 logits; dropped tokens get -inf."""
    logits = logits / jnp.float32(s.temperature)
    vocab = logits.shape[-1]
    k = min(s.top_k, vocab) if s.top_k else 0
    if k:
        top = jax.lax.top_k(logits, k)[0]  # descending
        logits = jnp.where(logits < top[:, -1:], -jnp.inf, logits)
    if s.top_p < 1.0:
        # Only the kept tokens carry probability: with top-k the k best are all there is.
        ranked = top if k else -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked higher
        keep = above < jnp.float32(s.top_p)
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose(logits: jax.Array, seen: jax.Array, s: Sampling, key: jax.Array) -> jax.Array:
    """The next token ``[b]`` int32 from ``[b, V]`` float32 logits."""
    logits = penalize(logits.astype(jnp.float32), seen, s.repetition_penalty)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp(logits, s), axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class RowSampling:
    """Per-row settings, for a batch whose rows are different requests (continuous
    batching): each row greedy or sampled with its own temperature, top-k, top-p and seed."""

    greedy: jax.Array  # [b] bool
    temperature: jax.Array  # [b] float32
    top_k: jax.Array  # [b] int32, 0 = off
    top_p: jax.Array  # [b] float32, 1 = off
    seed: jax.Array  # [b] uint32

    @staticmethod
    def of(settings: "list[Sampling]") -> "RowSampling":
        import numpy as np

        return RowSampling(greedy=np.asarray([s.greedy for s in settings]),
                           temperature=np.asarray([s.temperature for s in settings], np.float32),
                           top_k=np.asarray([s.top_k for s in settings], np.int32),
                           top_p=np.asarray([s.top_p for s in settings], np.float32),
                           seed=np.asarray([s.seed % 2**32 for s in settings], np.uint32))


def choose_rows(logits: jax.Array, s: RowSampling, step: jax.Array) -> jax.Array:
    """The next token ``[b]`` of each row by its own settings (the rules of :func:`warp`,
    no repetition penalty); a sampled row's key is ``fold_in(key(seed), step)``. When every
    row is greedy, only the argmax runs (no sort over the vocabulary)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.all(s.greedy), lambda: greedy, lambda: _sample_rows(logits, greedy, s, step))


def _sample_rows(logits: jax.Array, greedy: jax.Array, s: RowSampling, step: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    x = logits / s.temperature[:, None]
    ranked = -jnp.sort(-x, axis=-1)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=1)
    x = jnp.where(x < kth, -jnp.inf, x)
    ranked = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
    keys = jax.vmap(lambda seed, t: jax.random.fold_in(jax.random.key(seed), t))(s.seed, step)
    sampled = jax.vmap(jax.random.categorical)(keys, x)
    return jnp.where(s.greedy, greedy, sampled.astype(jnp.int32))
