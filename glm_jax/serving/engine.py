"""Continuous batching: requests join and leave a running batch of KV-cache slots.

The device holds ``slots`` rows of ``max_len`` cache slots each (prompt and answer; by
default the model's ``max_seq_len``). One engine thread repeats:

1. **Admit**: while a slot is free and a request waits, prefill the request alone (its
   prompt left-padded to a multiple of ``bucket`` tokens, so that prompts of nearby
   lengths share one compiled program), choose its first token, and copy its cache rows,
   tokens and positions into the free slot.
2. **Decode a chunk**: one compiled ``lax.while_loop`` advances every active slot up to
   ``chunk`` tokens (fewer when a request waits and a slot frees: it is admitted at once;
   and while a slot is free, only as many steps as take about ``ADMIT_WITHIN`` seconds, so a
   request that arrives meanwhile starts soon).
   Active requests always hold the lowest slots (a finished request's slot takes the last
   active row), so the chunk runs on the first ``rows`` slots only, ``rows`` the active
   count rounded up to a power of two: a half-empty server does half the work per token.
   Each row writes and attends at its own slot (``KVCache.index`` per row) and samples by
   its own settings (``sampling.RowSampling``); a row stops at a stop token or its token
   budget and then idles until freed.
3. **Hand out** each slot's new tokens to its request; a finished or cancelled request
   frees its slot at once, so a waiting request takes it before the next chunk.

On a generator with a mesh (``--model-parallel``), the programs run under its logical-axis
rules: weights split over ``model`` as the generator placed them, the slots' keys and values
split by heads, every other field whole on each device. The rows are not split over
``data`` (they change every chunk), so the mesh must have data = pipe = 1.

A request's tokens are those it would get alone (greedy: token for token, as the tests
check against ``Generator.generate``): its rows never see another request's slots, and
its positions are laid out from its own prompt (``decode.layout_batch``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from glm_jax.config import ConfigError
from glm_jax.inference import kv_cache
from glm_jax.inference.decode import Generator, layout_batch
from glm_jax.inference.sampling import RowSampling, Sampling, choose_rows
from glm_jax.parallel import rules


# While a slot is free, a decoding chunk lasts about this long, so that a request arriving
# meanwhile waits no longer than this for its prefill.
ADMIT_WITHIN = 0.05


class QueueFull(Exception):
    """The waiting queue is at its limit (the server answers 429)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: a prompt (ending in ``<sop>``), a token budget, its sampling, and
    ``on_tokens(new_ids, finish_reason)`` called from the engine thread as tokens arrive
    (``finish_reason`` None until the last call: ``"stop"``, ``"length"`` or ``"cancelled"``)."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    on_tokens: Callable[[list, Optional[str]], None] = lambda ids, finish: None
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    _cancelled: bool = False


@flax.struct.dataclass
class Slots:
    tokens: jax.Array  # [S, T]: each slot's prompt (left-padded to its bucket), then its tokens
    positions: jax.Array  # [S, T] or [S, 2, T]
    cache: kv_cache.KVCache  # S rows of T slots; index is set per step from t
    t: jax.Array  # [S] the next slot to fill
    limit: jax.Array  # [S] t stops here (prompt + budget)
    done: jax.Array  # [S] free, or finished
    sampling: RowSampling


class Engine:
    def __init__(self, generator: Generator, *, slots: int = 8, chunk: int = 8, bucket: int = 32,
                 max_queue: int = 64, max_len: Optional[int] = None, stop_tokens: Optional[Sequence[int]] = None):
        if slots < 1 or chunk < 1 or bucket < 1 or max_queue < 0:
            raise ConfigError(f"slots, chunk and bucket must be >= 1 and max_queue >= 0; got {slots}, {chunk}, "
                              f"{bucket}, {max_queue}")
        model_len = generator.cfg.max_seq_len
        if max_len is not None and not 2 <= max_len <= model_len:
            raise ConfigError(f"max_len={max_len}: a slot holds 2 to {model_len} tokens (the model's max_seq_len)")
        mesh = generator.mesh
        if mesh is not None and any(size > 1 for axis, size in mesh.shape.items() if axis != "model"):
            raise ConfigError(f"continuous batching splits a model over the mesh's model axis only (its slots change "
                              f"rows every chunk); got mesh {dict(mesh.shape)}: build it with data=1, pipe=1")
        self.gen = generator
        self.length = max_len or model_len
        # Prompts are laid out and checked against the slot length, not the model's.
        self.cfg = dataclasses.replace(generator.cfg, max_seq_len=self.length)
        self.n_slots, self.chunk, self.bucket, self.max_queue = slots, chunk, bucket, max_queue
        self.stops = tuple(generator.stop_tokens if stop_tokens is None else stop_tokens)
        self._stops = jnp.asarray(self.stops, jnp.int32)
        self._queue: collections.deque = collections.deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._prefill: dict = {}
        self._insert: dict = {}
        # On a mesh, every program hands the slots back laid out as they came (heads over
        # ``model``), so the next call reuses its compiled program.
        self._sharding = None if mesh is None else self._state_sharding()
        rep = None if mesh is None else rules.replicated(mesh)
        self._decode = self._jit(self._decode_chunk, (self._sharding, rep, rep), donate_argnums=(1,), static_argnums=(5, 6))
        self._release = self._jit(lambda state, slot: state.replace(done=state.done.at[slot].set(True)), self._sharding,
                                  donate_argnums=(0,))
        self._move = self._jit(self._move_row, self._sharding, donate_argnums=(0,))
        self.state = self._empty()
        self.error: Optional[BaseException] = None
        # Where the engine thread's time goes (bench serve reports it).
        self.stats = {"prefills": 0, "prefill_s": 0.0, "chunks": 0, "steps": 0, "decoded": 0, "decode_s": 0.0}

    # -- device programs -------------------------------------------------------------------
    def _jit(self, fn, out_shardings, **kwargs):
        """``jax.jit(fn)``; on a mesh, with its outputs laid out as ``out_shardings``."""
        if self.gen.mesh is None:
            return jax.jit(fn, **kwargs)
        return jax.jit(fn, out_shardings=out_shardings, **kwargs)

    def _state_sharding(self) -> Slots:
        """Where the slots live on the generator's mesh: keys and values split by heads over
        ``model`` (the cache's own rule), every other field whole on every device."""
        mesh = self.gen.mesh
        rep = rules.replicated(mesh)
        cache = kv_cache.sharding(mesh, self.cfg, decoding=True, split_batch=False)
        return Slots(tokens=rep, positions=rep, cache=cache, t=rep, limit=rep, done=rep,
                     sampling=RowSampling(greedy=rep, temperature=rep, top_k=rep, top_p=rep, seed=rep))

    def _empty(self) -> Slots:
        cfg, s, t = self.cfg, self.n_slots, self.length
        cache = kv_cache.allocate(cfg, s, t, np.zeros(s, np.int32)).replace(decoding=True, index=jnp.zeros(s, jnp.int32))
        positions = np.zeros((s, 2, t) if cfg.two_d_positions else (s, t), np.int32)
        state = Slots(tokens=jnp.full((s, t), cfg.pad_token_id, jnp.int32), positions=jnp.asarray(positions), cache=cache,
                      t=jnp.zeros(s, jnp.int32), limit=jnp.zeros(s, jnp.int32), done=jnp.ones(s, bool),
                      sampling=jax.tree.map(jnp.asarray, RowSampling.of([Sampling()] * s)))
        return state if self._sharding is None else jax.device_put(state, self._sharding)

    def _prefill_one(self, params, tokens, positions, prefix_len, segment_ids, start, sampling):
        logits, cache = self.gen._first(params, tokens, positions, prefix_len, segment_ids, start)
        first = choose_rows(logits, sampling, jnp.full((1,), tokens.shape[1], jnp.int32))
        return first, cache

    def _insert_one(self, state: Slots, slot, cache, tokens, positions, first, start, limit, sampling, stops) -> Slots:
        length = tokens.shape[1]
        put = lambda big, small: lax.dynamic_update_slice(big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))  # noqa: E731
        row = jnp.full((1, state.tokens.shape[1]), self.cfg.pad_token_id, jnp.int32).at[:, :length].set(tokens).at[:, length].set(first)
        done = jnp.isin(first, stops) | (limit <= length + 1)
        return state.replace(
            tokens=put(state.tokens, row),
            positions=put(state.positions, positions),
            cache=state.cache.replace(k=tuple(map(put, state.cache.k, cache.k)), v=tuple(map(put, state.cache.v, cache.v)),
                                      start=put(state.cache.start, start)),
            t=put(state.t, jnp.full((1,), length + 1, jnp.int32)),
            limit=put(state.limit, limit),
            done=put(state.done, done),
            sampling=jax.tree.map(put, state.sampling, sampling),
        )

    @staticmethod
    def _move_row(state: Slots, src, dst) -> Slots:
        """Row ``src`` copied to ``dst`` (keys, values, tokens, positions, sampling); ``src`` is freed."""
        moved = jax.tree.map(lambda x: x.at[dst].set(x[src]), state)
        return moved.replace(done=moved.done.at[src].set(True))

    def _decode_chunk(self, params, full: Slots, stops, refill, limit, steps: int, rows: int):
        # Only the first ``rows`` slots (all the active ones) decode: sliced out, then written back.
        state = full if rows == self.n_slots else jax.tree.map(lambda x: x[:rows], full)
        t0, done0 = state.t, state.done

        def running(carry):
            st, i = carry
            # With requests waiting (``refill``), the chunk ends as soon as a slot frees.
            freed = refill & jnp.any(st.done & ~done0)
            return (i < jnp.minimum(limit, steps)) & ~jnp.all(st.done) & ~freed

        def step(carry):
            st, i = carry
            active = ~st.done
            fed = jnp.maximum(st.t - 1, 0)
            last = jnp.take_along_axis(st.tokens, fed[:, None], axis=1)
            pos = jnp.take_along_axis(st.positions, fed.reshape((-1,) + (1,) * (st.positions.ndim - 1)), axis=-1)
            hidden, cache = self.gen.model.apply({"params": params}, last, pos, None, return_hidden=True,
                                                 cache=st.cache.replace(index=fed))
            token = choose_rows(self.gen._logits(params, hidden), st.sampling, st.t)
            at = jnp.minimum(st.t, st.tokens.shape[1] - 1)
            written = jnp.where(active, token, jnp.take_along_axis(st.tokens, at[:, None], axis=1)[:, 0])
            tokens = st.tokens.at[jnp.arange(st.tokens.shape[0]), at].set(written)
            t = st.t + active
            done = st.done | (active & (jnp.isin(token, stops) | (t >= st.limit)))
            return st.replace(tokens=tokens, cache=cache, t=t, done=done), i + 1

        state, _ = lax.while_loop(running, step, (state, jnp.zeros((), jnp.int32)))
        idx = jnp.minimum(t0[:, None] + jnp.arange(steps)[None, :], state.tokens.shape[1] - 1)
        new, counts = jnp.take_along_axis(state.tokens, idx, axis=1), state.t - t0
        if rows < self.n_slots:
            state = jax.tree.map(lambda big, small: lax.dynamic_update_slice_in_dim(big, small, 0, 0), full, state)
        return state, new, counts

    # -- host side ---------------------------------------------------------------------------
    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """The errors a request would meet, raised before it queues (``PromptError``)."""
        layout_batch([list(prompt)], self.cfg, max_tokens, 1)

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.max_tokens)
        request.sampling.validate()
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the limit is {self.max_queue})")
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: it leaves the queue, or frees its slot before the next chunk."""
        with self._lock:
            request._cancelled = True
            self._lock.notify_all()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _finish(self, request: Request, reason: str, new=()) -> None:
        """End ``request``; if it held a slot, the last active row moves into that slot, so
        the active requests keep the lowest slots."""
        request.finish_reason = reason
        slot = next((s for s, r in self._active.items() if r is request), None)
        if slot is not None:
            last = len(self._active) - 1
            if slot != last:
                self.state = self._move(self.state, np.int32(last), np.int32(slot))
                self._active[slot] = self._active.pop(last)
            else:
                del self._active[slot]
                if reason == "cancelled":  # the row stops decoding now, not at its budget
                    self.state = self._release(self.state, np.int32(slot))
        request.on_tokens(list(new), reason)

    def _admit(self) -> None:
        while True:
            with self._lock:
                while self._queue and self._queue[0]._cancelled:
                    self._finish(self._queue.popleft(), "cancelled")
                if len(self._active) == self.n_slots or not self._queue:
                    return
                request = self._queue.popleft()
                slot = len(self._active)  # the active requests hold slots 0 .. slot - 1
                self._active[slot] = request
            self._place(slot, request)

    def _place(self, slot: int, request: Request) -> None:
        batch = layout_batch([list(request.prompt)], self.cfg, request.max_tokens, self.bucket)
        length = batch.tokens.shape[1]
        prefix_len, segment_ids = batch.prefix_len, batch.segment_ids
        if segment_ids is None:  # a prompt that fills its bucket: the padded form, so one program per bucket
            prefix_len, segment_ids = prefix_len[:, None], np.ones_like(batch.tokens)
        if length not in self._prefill:
            self._prefill[length] = jax.jit(self._prefill_one)
            self._insert[length] = self._jit(self._insert_one, self._sharding, donate_argnums=(0,))
        sampling = jax.tree.map(jnp.asarray, RowSampling.of([request.sampling]))
        positions = np.zeros(batch.positions.shape[:-1] + (self.length,), np.int32)
        positions[..., : batch.positions.shape[-1]] = batch.positions
        began = time.perf_counter()
        first, cache = self._prefill[length](self.gen.params, batch.tokens, positions[..., :length], prefix_len,
                                             segment_ids, batch.start, sampling)
        limit = np.asarray([length + request.max_tokens], np.int32)
        self.state = self._insert[length](self.state, np.int32(slot), cache, batch.tokens, positions, first,
                                       batch.start, limit, sampling, self._stops)
        token = int(first[0])
        request.first_token_at = time.perf_counter()
        self.stats["prefills"] += 1
        self.stats["prefill_s"] += request.first_token_at - began
        self._hand_out(request, [token])

    def _hand_out(self, request: Request, new: list) -> None:
        """Give ``new`` tokens to the request; finish it at a stop token or its budget."""
        for i, token in enumerate(new):
            if token in self.stops:
                request.tokens.extend(new[:i])
                self._finish(request, "stop", new[:i])
                return
        request.tokens.extend(new)
        if len(request.tokens) >= request.max_tokens:
            self._finish(request, "length", new)
        else:
            request.on_tokens(list(new), None)

    def step(self) -> bool:
        """Admit what fits, decode one chunk, hand out its tokens; False when idle."""
        with rules.mesh_context(self.gen.mesh):  # the mesh and logical-axis rules (nothing on one device)
            return self._step()

    def _step(self) -> bool:
        with self._lock:
            for request in list(self._active.values()):
                if request._cancelled:
                    self._finish(request, "cancelled")
        self._admit()
        if not self._active:
            return False
        with self._lock:
            refill = bool(self._queue)
        rows = min(self.n_slots, 1 << (len(self._active) - 1).bit_length())
        limit = self.chunk
        if len(self._active) < self.n_slots and self.stats["steps"]:
            # A slot is free: a request may arrive at any moment, so the chunk lasts about
            # ADMIT_WITHIN seconds (by the measured step time), not ``chunk`` steps.
            step_s = self.stats["decode_s"] / self.stats["steps"]
            limit = max(1, min(self.chunk, int(ADMIT_WITHIN / step_s)))
        began = time.perf_counter()
        self.state, new, counts = self._decode(self.gen.params, self.state, self._stops, np.bool_(refill),
                                               np.int32(limit), self.chunk, rows)
        new, counts = np.asarray(new), np.asarray(counts)
        self.stats["chunks"] += 1
        self.stats["steps"] += int(counts.max())
        self.stats["decoded"] += int(counts.sum())
        self.stats["decode_s"] += time.perf_counter() - began
        with self._lock:
            # Slots as they were in the chunk (finishing moves rows: look them up first).
            for slot, request in list(self._active.items()):
                if request._cancelled:
                    self._finish(request, "cancelled")
                elif counts[slot]:
                    self._hand_out(request, new[slot, : counts[slot]].tolist())
        return True

    def row_counts(self) -> list[int]:
        """The row counts a decoding chunk is compiled for: powers of two below the slots, and the slots."""
        return sorted({min(self.n_slots, 1 << i) for i in range(self.n_slots.bit_length() + 1)})

    def warm(self, prompt_lengths: Sequence[int] = (), log: Callable[[str], None] = lambda line: None) -> "Engine":
        """Compile before serving (call before :meth:`start`): the decoding chunk for every row
        count, and the prefill of prompts of these lengths (one per ``bucket`` multiple)."""
        if self._thread is not None:
            raise RuntimeError("warm() runs before start()")
        with rules.mesh_context(self.gen.mesh):
            return self._warm(prompt_lengths, log)

    def _warm(self, prompt_lengths, log) -> "Engine":
        for rows in self.row_counts():
            log(f"compiling the decoding chunk for {rows} slot(s)")
            self.state, *_ = self._decode(self.gen.params, self.state, self._stops, np.bool_(False), np.int32(1),
                                          self.chunk, rows)
        cfg = self.cfg
        for length in sorted({-(-n // self.bucket) * self.bucket for n in prompt_lengths}):
            n = min(length, self.length - 1)
            log(f"compiling the prefill of {n}-token prompts")
            filler = next(i for i in range(5, cfg.vocab_size) if i not in (cfg.mask_token_id, cfg.gmask_token_id,
                                                                             cfg.smask_token_id, cfg.sop_token_id))
            request = Request([filler] * (n - 2) + [cfg.gmask_token_id, cfg.sop_token_id], 1)
            self._active[0] = request
            self._place(0, request)  # one token: finished (and its slot freed) by its prefill
        jax.block_until_ready(self.state)
        return self

    # -- the engine thread -------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="glm_jax-engine", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.step():
                    with self._lock:
                        if not self._queue and not self._stopping:
                            self._lock.wait(timeout=0.5)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            self.error = e
            with self._lock:  # no device work here: the device may be what failed
                failed = list(self._active.values()) + list(self._queue)
                self._active.clear()
                self._queue.clear()
                for request in failed:
                    request.finish_reason = "error"
                    request.on_tokens([], "error")
            raise

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
