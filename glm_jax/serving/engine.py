"""Continuous batching: requests join and leave a running batch of KV-cache slots.

The device holds ``slots`` rows of ``model.max_seq_len`` cache slots each. One engine
thread repeats:

1. **Admit**: while a slot is free and a request waits, prefill the request alone (its
   prompt left-padded to a multiple of ``bucket`` tokens, so that prompts of nearby
   lengths share one compiled program), choose its first token, and copy its cache rows,
   tokens and positions into the free slot.
2. **Decode a chunk**: one compiled ``lax.while_loop`` advances every active slot up to
   ``chunk`` tokens. Each row writes and attends at its own slot (``KVCache.index`` per
   row) and samples by its own settings (``sampling.RowSampling``); a row stops at a stop
   token or its token budget and then idles until freed.
3. **Hand out** each slot's new tokens to its request; a finished or cancelled request
   frees its slot at once, so a waiting request takes it before the next chunk.

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
                 max_queue: int = 64, stop_tokens: Optional[Sequence[int]] = None):
        if slots < 1 or chunk < 1 or bucket < 1 or max_queue < 0:
            raise ConfigError(f"slots, chunk and bucket must be >= 1 and max_queue >= 0; got {slots}, {chunk}, "
                              f"{bucket}, {max_queue}")
        if generator.mesh is not None:
            raise ConfigError("continuous batching runs on one device for now (no --model-parallel)")
        self.gen, self.cfg = generator, generator.cfg
        self.n_slots, self.chunk, self.bucket, self.max_queue = slots, chunk, bucket, max_queue
        self.length = self.cfg.max_seq_len
        self.stops = tuple(generator.stop_tokens if stop_tokens is None else stop_tokens)
        self._stops = jnp.asarray(self.stops, jnp.int32)
        self._queue: collections.deque = collections.deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._prefill: dict = {}
        self._insert: dict = {}
        self._decode = jax.jit(self._decode_chunk, donate_argnums=(1,), static_argnums=(3,))
        self._release = jax.jit(lambda state, slot: state.replace(done=state.done.at[slot].set(True)), donate_argnums=(0,))
        self.state = self._empty()
        self.error: Optional[BaseException] = None

    # -- device programs -------------------------------------------------------------------
    def _empty(self) -> Slots:
        cfg, s, t = self.cfg, self.n_slots, self.length
        cache = kv_cache.allocate(cfg, s, t, np.zeros(s, np.int32)).replace(decoding=True, index=jnp.zeros(s, jnp.int32))
        positions = np.zeros((s, 2, t) if cfg.two_d_positions else (s, t), np.int32)
        return Slots(tokens=jnp.full((s, t), cfg.pad_token_id, jnp.int32), positions=jnp.asarray(positions), cache=cache,
                     t=jnp.zeros(s, jnp.int32), limit=jnp.zeros(s, jnp.int32), done=jnp.ones(s, bool),
                     sampling=jax.tree.map(jnp.asarray, RowSampling.of([Sampling()] * s)))

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

    def _decode_chunk(self, params, state: Slots, stops, steps: int):
        t0 = state.t

        def running(carry):
            st, i = carry
            return (i < steps) & ~jnp.all(st.done)

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
        return state, jnp.take_along_axis(state.tokens, idx, axis=1), state.t - t0

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

    def _finish(self, slot: Optional[int], request: Request, reason: str, new=()) -> None:
        request.finish_reason = reason
        if slot is not None:
            self._active.pop(slot, None)
            if reason == "cancelled":  # the row stops decoding now, not at its budget
                self.state = self._release(self.state, np.int32(slot))
        request.on_tokens(list(new), reason)

    def _admit(self) -> None:
        while True:
            with self._lock:
                while self._queue and self._queue[0]._cancelled:
                    self._finish(None, self._queue.popleft(), "cancelled")
                free = [s for s in range(self.n_slots) if s not in self._active]
                if not free or not self._queue:
                    return
                request = self._queue.popleft()
                slot = free[0]
                self._active[slot] = request
            self._place(slot, request)

    def _place(self, slot: int, request: Request) -> None:
        batch = layout_batch([list(request.prompt)], self.cfg, request.max_tokens, self.bucket)
        length = batch.tokens.shape[1]
        key = (length, batch.segment_ids is None)
        if key not in self._prefill:
            self._prefill[key] = jax.jit(self._prefill_one)
            self._insert[key] = jax.jit(self._insert_one, donate_argnums=(0,))
        sampling = jax.tree.map(jnp.asarray, RowSampling.of([request.sampling]))
        positions = np.zeros(batch.positions.shape[:-1] + (self.length,), np.int32)
        positions[..., : batch.positions.shape[-1]] = batch.positions
        first, cache = self._prefill[key](self.gen.params, batch.tokens, positions[..., :length], batch.prefix_len,
                                          batch.segment_ids, batch.start, sampling)
        limit = np.asarray([length + request.max_tokens], np.int32)
        self.state = self._insert[key](self.state, np.int32(slot), cache, batch.tokens, positions, first,
                                       batch.start, limit, sampling, self._stops)
        token = int(first[0])
        request.first_token_at = time.perf_counter()
        self._hand_out(slot, request, [token])

    def _hand_out(self, slot: int, request: Request, new: list) -> None:
        """Give ``new`` tokens to the request; finish it at a stop token or its budget."""
        for i, token in enumerate(new):
            if token in self.stops:
                request.tokens.extend(new[:i])
                self._finish(slot, request, "stop", new[:i])
                return
        request.tokens.extend(new)
        if len(request.tokens) >= request.max_tokens:
            self._finish(slot, request, "length", new)
        else:
            request.on_tokens(list(new), None)

    def step(self) -> bool:
        """Admit what fits, decode one chunk, hand out its tokens; False when idle."""
        with self._lock:
            for slot, request in list(self._active.items()):
                if request._cancelled:
                    self._finish(slot, request, "cancelled")
        self._admit()
        if not self._active:
            return False
        self.state, new, counts = self._decode(self.gen.params, self.state, self._stops, self.chunk)
        new, counts = np.asarray(new), np.asarray(counts)
        with self._lock:
            for slot, request in list(self._active.items()):
                if request._cancelled:
                    self._finish(slot, request, "cancelled")
                elif counts[slot]:
                    self._hand_out(slot, request, new[slot, : counts[slot]].tolist())
        return True

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
            with self._lock:
                for slot, request in list(self._active.items()):
                    self._finish(slot, request, "error")
                while self._queue:
                    self._finish(None, self._queue.popleft(), "error")
            raise

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
