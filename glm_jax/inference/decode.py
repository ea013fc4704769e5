"""Generation with a KV cache: one prefill pass, then a compiled decoding loop.

    gen = Generator(cfg, params)                     # optionally mesh=... to shard over `model`
    out = gen.generate(prompts, max_new_tokens=64)   # [b, prompt + 64] token ids
    for new in gen.stream(prompts, 64, chunk=8): ... # [b, n] tokens as they are produced

A prompt is what the authors' models take: ``text [gMASK] <sop>`` (ChatGLM-6B's tokenizer
appends both), or ``text [MASK] text <sop>`` for GLM-130B's blank filling (§1.6). The
prompts of a batch are left-padded to one length with ``pad_token_id``, as ChatGLM's
tokenizer pads. The positions of every slot, generated ones included, come from
``glm_jax.model.positions.prepare_inputs`` (the authors' rules: 1D for GLM-130B, 2D for
ChatGLM-6B), applied once to the prompt followed by placeholders: the rules depend only
on where the prompt's mask and ``<sop>`` are.

**Prefill** runs the ordinary forward pass over the prompts (Part A bidirectional,
``<sop>`` causal), stores every layer's keys and values in the cache and chooses the
first new token. **Decoding** is a ``lax.while_loop`` on the device: feed the last token
(a Part B query against the cache, ``kernels/decode.py``), choose the next
(``sampling.py``), until every example has produced a stop token or the loop reaches its
slot limit. The loop runs ``chunk`` tokens per call: ``generate`` makes one call for the
whole budget; ``stream`` hands each chunk back to the host as soon as it is done, with no
host round trip per token and nothing but the chunk boundary changed (the key of step t
is the same either way). A callback inside the loop (``io_callback``) would stream token
by token, but it syncs the host on every step and does not compose with a sharded,
multi-host loop; a chunk of K tokens costs one dispatch per K tokens and streams in
bursts a few tens of milliseconds apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from glm_jax.config import ConfigError, ModelConfig
from glm_jax.inference import beam_search, kv_cache, quantize, weights
from glm_jax.inference.sampling import Sampling, choose
from glm_jax.model import GLM, abstract_params, prepare_inputs
from glm_jax.parallel import rules


class PromptError(ConfigError):
    """Prompts the model cannot continue (empty, too long, ids outside the vocabulary, no <sop>)."""


@flax.struct.dataclass
class State:
    tokens: jax.Array  # [b, slots]: prompts, then generated tokens (pad once an example has stopped)
    positions: jax.Array  # [b, slots] or [b, 2, slots]: every slot's position
    cache: kv_cache.KVCache
    t: jax.Array  # [] the next slot to fill
    done: jax.Array  # [b] the example has produced a stop token
    seen: jax.Array  # [b, vocab] tokens in the sequence so far (repetition penalty)


@flax.struct.dataclass
class BeamState:
    tokens: jax.Array  # [b * k, slots]: each beam's prompt and generated tokens
    positions: jax.Array  # [b * k, (2,) slots]
    cache: kv_cache.KVCache  # b * k rows
    t: jax.Array  # [] the next slot to fill
    scores: jax.Array  # [b, k] each running beam's sum of log-probabilities
    done: jax.Array  # [b]
    finished: beam_search.Finished
    context_len: jax.Array  # [b] the length the length penalty counts before the new tokens


@dataclasses.dataclass
class Batch:
    """Prompts laid out for the device: left-padded, with every slot's position."""

    tokens: np.ndarray  # [b, prompt_len] left-padded prompts
    positions: np.ndarray  # [b, (2,) prompt_len + max_new_tokens]
    prefix_len: np.ndarray
    segment_ids: Optional[np.ndarray]
    start: np.ndarray  # [b] leading pads
    width: int  # the caller's prompt width: output rows are the last width + new slots


def _rows(prompts, pad: int) -> list[np.ndarray]:
    """Each prompt without its left padding."""
    if isinstance(prompts, np.ndarray) or (len(prompts) and np.ndim(prompts[0]) == 1 and _uniform(prompts)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise PromptError(f"prompts must be [batch, seq] token ids or a list of id lists; got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise PromptError(f"prompts must be integer token ids; got {arr.dtype}")
        rows = [np.asarray(r, np.int64) for r in arr]
    else:
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompts]
    out = []
    for r in rows:
        n = 0
        while n < len(r) and r[n] == pad:
            n += 1
        out.append(r[n:])
    return out


def _uniform(prompts) -> bool:
    return len({len(p) for p in prompts}) == 1


def check_prompts(rows: Sequence[np.ndarray], cfg: ModelConfig, max_new_tokens: int) -> None:
    """One clear error for prompts the model cannot continue."""
    if not len(rows):
        raise PromptError("no prompts given")
    if max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    masks = (cfg.mask_token_id, cfg.smask_token_id, cfg.gmask_token_id)
    for i, r in enumerate(rows):
        if not len(r):
            raise PromptError(f"prompt {i} is empty")
        bad = r[(r < 0) | (r >= cfg.vocab_size)]
        if bad.size:
            raise PromptError(f"prompt {i}: token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
        sop = np.flatnonzero(r == cfg.sop_token_id)
        if not sop.size:
            raise PromptError(
                f"prompt {i} has no <sop> (id {cfg.sop_token_id}); GLM continues `text [gMASK] <sop>` "
                f"(ChatGLM's tokenizer appends [gMASK]={cfg.gmask_token_id} and <sop>={cfg.sop_token_id})"
            )
        if not np.isin(r[: sop[0]], masks).any():
            raise PromptError(
                f"prompt {i} has no [MASK]/[sMASK]/[gMASK] before its <sop>; the position rules need the mask "
                f"the model fills (ids {', '.join(map(str, masks))})"
            )
    longest = max(len(r) for r in rows)
    if longest > cfg.max_seq_len:
        raise PromptError(f"a prompt of {longest} tokens is longer than the model's maximum of {cfg.max_seq_len} (model.max_seq_len)")
    if longest + max_new_tokens > cfg.max_seq_len:
        raise PromptError(
            f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's maximum of "
            f"{cfg.max_seq_len} (model.max_seq_len); ask for at most {cfg.max_seq_len - longest} new tokens"
        )


def layout_batch(prompts, cfg: ModelConfig, max_new_tokens: int, bucket: int = 1) -> Batch:
    """Strip and redo the left padding (to a multiple of ``bucket`` where it fits, so that
    nearby prompt lengths share a compiled program) and compute every slot's position."""
    width = np.shape(prompts)[1] if isinstance(prompts, np.ndarray) and np.ndim(prompts) == 2 else None
    rows = _rows(prompts, cfg.pad_token_id)
    check_prompts(rows, cfg, max_new_tokens)
    longest = max(len(r) for r in rows)
    length = -(-longest // bucket) * bucket
    length = max(longest, min(length, cfg.max_seq_len - max_new_tokens))
    if width is not None:
        length = max(length, width)
    b = len(rows)
    full = np.full((b, length + max_new_tokens), cfg.pad_token_id, np.int64)
    for i, r in enumerate(rows):
        full[i, length - len(r) : length] = r
    # Placeholders after the prompt: any ordinary id works, the rules look only at the
    # prompt's mask and <sop>; take one that is not special.
    specials = {cfg.mask_token_id, cfg.smask_token_id, cfg.gmask_token_id, cfg.sop_token_id, cfg.pad_token_id}
    filler = next(i for i in range(cfg.vocab_size) if i not in specials)
    full[:, length:] = filler
    inputs = prepare_inputs(full, cfg)
    seg = inputs["segment_ids"]
    return Batch(
        tokens=full[:, :length].astype(np.int32),
        positions=inputs["positions"],
        prefix_len=inputs["prefix_len"],
        segment_ids=None if seg is None else seg[:, :length],
        start=np.asarray([length - len(r) for r in rows], np.int32),
        width=longest if width is None else width,
    )


class Generator:
    """Compiled prefill and decoding loop for one model and its parameters.

    params: float or quantized (``glm_jax.inference.quantize``) parameters, scanned or
      unrolled; they are laid out for generation once (``glm_jax.inference.weights``:
      layers unrolled, matrices in the compute dtype, compact weights on a CPU), and
      ``self.cfg`` / ``self.params`` are the generation config and parameters.
    mesh: shard parameters, cache and batch over it by the logical-axis rules
      (``glm_jax.parallel.rules``: heads and the MLP over ``model``, the batch over ``data``).
    stop_tokens: ids that end an example (default ``<eop>`` and eos, as the authors stop).
    """

    def __init__(self, cfg: ModelConfig, params: Any, *, mesh=None, stop_tokens: Optional[Sequence[int]] = None):
        cfg, params = weights.for_generation(cfg, params, mesh=mesh)
        self.cfg = cfg
        self.model = GLM(cfg)
        self.mesh = mesh
        self.stop_tokens = tuple(stop_tokens) if stop_tokens is not None else tuple(sorted({cfg.eop_token_id, cfg.eos_token_id}))
        self._param_shardings = None
        if mesh is not None:
            self._param_shardings = param_shardings(cfg, params, mesh)
            params = jax.device_put(params, self._param_shardings)
        self.params = params
        self._compiled: dict = {}

    # -- the two device programs -------------------------------------------------------
    def _emit(self, st: State, logits: jax.Array, key: jax.Array, stops: jax.Array, s: Sampling) -> State:
        """Choose the token of slot ``t`` from ``logits`` and write it."""
        cfg = self.cfg
        tok = choose(logits, st.seen, s, jax.random.fold_in(key, st.t))
        tok = jnp.where(st.done, cfg.pad_token_id, tok)
        tokens = lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], st.t, axis=1)
        done = st.done | jnp.isin(tok, stops)
        seen = st.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
        return st.replace(tokens=tokens, t=st.t + 1, done=done, seen=seen)

    def _logits(self, params, hidden: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, hidden, method=GLM.head)[:, -1]

    def _first(self, params, tokens, positions, prefix_len, segment_ids, start):
        """The prompts' pass: the next token's logits ``[b, V]`` and the filled cache."""
        b, length = tokens.shape
        cache = kv_cache.allocate(self.cfg, b, positions.shape[-1], start)
        hidden, cache = self.model.apply(
            {"params": params}, tokens, positions[..., :length], prefix_len, segment_ids, return_hidden=True, cache=cache
        )
        return self._logits(params, hidden[:, -1:]), cache.advance(length)

    def _next(self, params, tokens, positions, cache, t):
        """One decoding step's logits ``[b, V]``: the token of slot ``t - 1`` against the cache."""
        last = lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)
        pos = lax.dynamic_slice_in_dim(positions, t - 1, 1, axis=positions.ndim - 1)
        hidden, cache = self.model.apply({"params": params}, last, pos, None, return_hidden=True, cache=cache)
        return self._logits(params, hidden), cache.advance(1)

    def _prefill(self, params, tokens, positions, prefix_len, segment_ids, start, key, stops, *, s: Sampling) -> State:
        cfg = self.cfg
        b, length = tokens.shape
        slots = positions.shape[-1]
        logits, cache = self._first(params, tokens, positions, prefix_len, segment_ids, start)
        buffer = jnp.full((b, slots), cfg.pad_token_id, jnp.int32).at[:, :length].set(tokens)
        real = jnp.arange(length)[None, :] >= start[:, None]
        seen = jnp.zeros((b, cfg.vocab_size), bool).at[jnp.arange(b)[:, None], tokens].max(real)
        st = State(
            tokens=buffer,
            positions=positions,
            cache=cache,
            t=jnp.asarray(length, jnp.int32),
            done=jnp.zeros((b,), bool),
            seen=seen,
        )
        return self._emit(st, logits, key, stops, s)

    def _decode(self, params, st: State, key, stops, limit, *, s: Sampling) -> State:
        def running(st: State):
            return (st.t < limit) & ~jnp.all(st.done)

        def step(st: State) -> State:
            logits, cache = self._next(params, st.tokens, st.positions, st.cache, st.t)
            return self._emit(st.replace(cache=cache), logits, key, stops, s)

        return lax.while_loop(running, step, st)

    # -- beam search (glm_jax.inference.beam_search) -------------------------------------
    def _beam_step(self, st: BeamState, logits, stops, first_gen: int, beams: beam_search.BeamSearch) -> BeamState:
        b, k_in = st.scores.shape
        logits = beam_search.constrain(logits, st.tokens, st.t, first_gen, st.cache.start, stops, beams)
        generated = st.t - first_gen
        rows, token, scores, done, finished = beam_search.step(
            logits, st.scores, st.tokens[:, first_gen:], generated, st.context_len, st.done, st.finished, stops, beams)
        tokens = jnp.take(st.tokens, rows, axis=0)
        tokens = lax.dynamic_update_slice_in_dim(tokens, token[:, None], st.t, axis=1)
        return st.replace(tokens=tokens, positions=jnp.take(st.positions, rows, axis=0), cache=st.cache.take(rows),
                          t=st.t + 1, scores=scores, done=done, finished=finished)

    def _beam_prefill(self, params, tokens, positions, prefix_len, segment_ids, start, stops, context_len, *,
                      beams: beam_search.BeamSearch) -> BeamState:
        b, length = tokens.shape
        slots = positions.shape[-1]
        logits, cache = self._first(params, tokens, positions, prefix_len, segment_ids, start)
        st = BeamState(
            tokens=jnp.full((b, slots), self.cfg.pad_token_id, jnp.int32).at[:, :length].set(tokens),
            positions=positions,
            cache=cache,
            t=jnp.asarray(length, jnp.int32),
            scores=jnp.zeros((b, 1), jnp.float32),
            done=jnp.zeros((b,), bool),
            finished=beam_search.no_finished(b, beams.num_beams, slots - length, self.cfg.pad_token_id),
            context_len=context_len,
        )
        return self._beam_step(st, logits, stops, length, beams)

    def _beam_decode(self, params, st: BeamState, stops, limit, *, first_gen: int, beams) -> BeamState:
        def running(st: BeamState):
            return (st.t < limit) & ~jnp.all(st.done)

        def step(st: BeamState) -> BeamState:
            logits, cache = self._next(params, st.tokens, st.positions, st.cache, st.t)
            return self._beam_step(st.replace(cache=cache), logits, stops, first_gen, beams)

        return lax.while_loop(running, step, st)

    def beam_search(
        self,
        prompts,
        max_new_tokens: int,
        beams: beam_search.BeamSearch = beam_search.BeamSearch(),
        *,
        bucket: int = 1,
        stop_tokens: Optional[Sequence[int]] = None,
        context_lengths: Optional[Sequence[int]] = None,
    ) -> list[list[beam_search.Hypothesis]]:
        """Each prompt's hypotheses, best first (``glm_jax.inference.beam_search``): at most
        ``beams.num_beams`` of them, each the generated tokens without the stop token.

        context_lengths: per prompt, the length the length penalty adds to the generated
          tokens' (default: the prompt's own length)."""
        beams = beams.validate(self.cfg.vocab_size)
        batch = layout_batch(prompts, self.cfg, max_new_tokens, bucket)
        length = batch.tokens.shape[1]
        if context_lengths is None:
            context_lengths = length - batch.start
        context_len = np.asarray(context_lengths, np.int32).reshape(-1)
        if context_len.shape[0] != batch.tokens.shape[0]:
            raise PromptError(f"{context_len.shape[0]} context lengths for {batch.tokens.shape[0]} prompts")
        stops = jnp.asarray(self.stop_tokens if stop_tokens is None else list(stop_tokens), jnp.int32)
        key = ("beam", beams, batch.segment_ids is None, length)
        if key not in self._compiled:
            self._compiled[key] = (
                jax.jit(lambda *a: self._beam_prefill(*a, beams=beams)),
                jax.jit(lambda *a: self._beam_decode(*a, first_gen=length, beams=beams), donate_argnums=(1,)),
            )
        prefill, decode = self._compiled[key]
        with self._context():
            st = prefill(self.params, batch.tokens, batch.positions, batch.prefix_len, batch.segment_ids, batch.start,
                         stops, context_len)
            if max_new_tokens > 1:
                st = decode(self.params, st, stops, jnp.asarray(length + max_new_tokens, jnp.int32))
            b, k = st.scores.shape
            n = int(st.t) - length
            return beam_search.finalize(
                {"tokens": np.asarray(st.finished.tokens), "length": np.asarray(st.finished.length),
                 "score": np.asarray(st.finished.score)},
                np.asarray(st.scores), np.asarray(st.tokens[:, length:]).reshape(b, k, -1), n, np.asarray(st.done),
                context_len, np.asarray(stops), beams)

    def _programs(self, s: Sampling, batch: Batch):
        s = dataclasses.replace(s, seed=0)  # the key is an argument: one program for every seed
        key = (s, batch.segment_ids is None)
        if key in self._compiled:
            return self._compiled[key]
        prefill = jax.jit(lambda *a: self._prefill(*a, s=s))
        decode = jax.jit(lambda *a: self._decode(*a, s=s), donate_argnums=(1,))
        if self.mesh is not None:
            st_sh = state_shardings(self.mesh, self.cfg, batch.positions.ndim)
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            bsh = _batch_sharding(self.mesh)
            seg = None if batch.segment_ids is None else bsh(2)
            prefill = jax.jit(
                lambda *a: self._prefill(*a, s=s),
                in_shardings=(self._param_shardings, bsh(2), bsh(batch.positions.ndim), bsh(batch.prefix_len.ndim), seg, bsh(1), rep, rep),
                out_shardings=st_sh,
            )
            decode = jax.jit(
                lambda *a: self._decode(*a, s=s),
                in_shardings=(self._param_shardings, st_sh, rep, rep, rep),
                out_shardings=st_sh,
                donate_argnums=(1,),
            )
        self._compiled[key] = (prefill, decode)
        return prefill, decode

    def _context(self):
        return rules.mesh_context(self.mesh)

    # -- host side -------------------------------------------------------------------
    def stream(
        self,
        prompts,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        chunk: Optional[int] = None,
        bucket: int = 1,
        stop_tokens: Optional[Sequence[int]] = None,
    ) -> Iterator[np.ndarray]:
        """Yield ``[b, n]`` blocks of new tokens as they are produced (first the prefill's one
        token, then up to ``chunk`` per block); pad follows an example's stop token."""
        batch = layout_batch(prompts, self.cfg, max_new_tokens, bucket)
        return self._run(batch, max_new_tokens, sampling.validate(), chunk, stop_tokens)

    def generate(
        self,
        prompts,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        bucket: int = 1,
        stop_tokens: Optional[Sequence[int]] = None,
    ) -> np.ndarray:
        """``[b, width + max_new_tokens]``: each prompt (left-padded to the widest, or as
        given for an array) followed by its new tokens; pad after an example's stop token.
        ``stop_tokens`` replaces the generator's for this call."""
        batch = layout_batch(prompts, self.cfg, max_new_tokens, bucket)
        new = np.concatenate(list(self._run(batch, max_new_tokens, sampling.validate(), None, stop_tokens)), axis=1)
        new = np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=self.cfg.pad_token_id)
        length = batch.tokens.shape[1]
        return np.concatenate([batch.tokens[:, length - batch.width :], new], axis=1)

    def prompt_rows(self, prompts, max_new_tokens: int, bucket: int = 1) -> np.ndarray:
        """The prompts as :meth:`generate` returns them: left-padded to the widest (or as given)."""
        batch = layout_batch(prompts, self.cfg, max_new_tokens, bucket)
        return batch.tokens[:, batch.tokens.shape[1] - batch.width:]

    def compiled(self, prompts, max_new_tokens: int, sampling: Sampling = Sampling(), *, bucket: int = 1):
        """The compiled (prefill, decoding loop) programs for these prompts, for inspection:
        ``.as_text()`` is the optimised HLO, ``.memory_analysis()`` the temporary memory a
        step needs beyond parameters and cache (nothing weight-sized, by construction)."""
        batch = layout_batch(prompts, self.cfg, max_new_tokens, bucket)
        prefill, decode = self._programs(sampling.validate(), batch)
        key = jax.random.key(0)
        stops = jnp.asarray(self.stop_tokens, jnp.int32)
        args = (self.params, batch.tokens, batch.positions, batch.prefix_len, batch.segment_ids, batch.start, key, stops)
        with self._context():
            state = jax.eval_shape(prefill, *args)
            limit = jnp.asarray(batch.tokens.shape[1] + max_new_tokens, jnp.int32)
            return prefill.lower(*args).compile(), decode.lower(self.params, state, key, stops, limit).compile()

    def _run(self, batch: Batch, max_new_tokens: int, s: Sampling, chunk: Optional[int], stop_tokens) -> Iterator[np.ndarray]:
        chunk = max_new_tokens if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        prefill, decode = self._programs(s, batch)
        key = jax.random.key(s.seed)
        stops = jnp.asarray(self.stop_tokens if stop_tokens is None else list(stop_tokens), jnp.int32)
        length = batch.tokens.shape[1]
        end = length + max_new_tokens
        with self._context():
            st = prefill(self.params, batch.tokens, batch.positions, batch.prefix_len, batch.segment_ids, batch.start, key, stops)
            t = length + 1
            yield np.asarray(st.tokens[:, length:t])
            while t < end and not bool(jnp.all(st.done)):
                st = decode(self.params, st, key, stops, jnp.asarray(min(t + chunk, end), jnp.int32))
                new_t = int(st.t)
                yield np.asarray(st.tokens[:, t:new_t])
                t = new_t


def _batch_sharding(mesh) -> Callable[[int], Any]:
    return lambda ndim: rules.batch_sharding(mesh, ndim)


def state_shardings(mesh, cfg: ModelConfig, positions_ndim: int) -> State:
    bsh = _batch_sharding(mesh)
    return State(
        tokens=bsh(2),
        positions=bsh(positions_ndim),
        cache=kv_cache.sharding(mesh, cfg, decoding=True),
        t=rules.replicated(mesh),
        done=bsh(1),
        seen=bsh(2),
    )


def param_shardings(cfg: ModelConfig, params: Any, mesh) -> Any:
    """NamedShardings for ``params`` (float or quantized) from the model's logical axis names."""
    specs = quantize.logical_specs(params, rules.logical_specs(abstract_params(cfg, boxed=True)))
    return rules.logical_to_sharding(specs, mesh)
