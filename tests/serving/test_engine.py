"""Continuous batching: requests of mixed lengths and budgets, more than there are slots,
each get exactly the tokens they get alone; a later short request overtakes a long one;
cancelled requests free their slots; a full queue refuses."""

import numpy as np
import pytest

from inference.inference_fixtures import random_params
from glm_jax.inference.decode import Generator
from glm_jax.inference.sampling import Sampling
from glm_jax.serving.engine import Engine, QueueFull, Request
from helpers import variant


@pytest.fixture(scope="module")
def generator():
    cfg = variant("chatglm-6b")
    return Generator(cfg, random_params(cfg))


def _prompt(cfg, n, seed):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1, 99, n)] + [cfg.gmask_token_id, cfg.sop_token_id]


# References are generated once per prompt at this budget, with no stop tokens, and cut:
# greedy answers are prefixes of each other, and one budget compiles one program per prompt
# length for the whole module rather than one per (length, budget).
LONGEST = 40
_greedy: dict = {}


def _alone(gen, prompt, n, stops=True):
    """The first ``n`` greedy tokens of ``prompt`` generated alone, cut at a stop token
    (unless ``stops`` is False), and the finish reason."""
    assert n <= LONGEST
    key = tuple(prompt)
    if key not in _greedy:
        _greedy[key] = gen.generate([list(prompt)], LONGEST, stop_tokens=())[0, -LONGEST:].tolist()
    out = []
    for t in _greedy[key][:n]:
        if stops and t in gen.stop_tokens:
            return out, "stop"
        out.append(t)
    return out, "length"


def _tokens(gen, prompt, n):
    """The ``n`` greedy tokens alone with no stop token (engines built with ``stop_tokens=()``)."""
    return _alone(gen, prompt, n, stops=False)[0]


def _run(engine, requests, limit=500):
    for _ in range(limit):
        if all(r.finish_reason for r in requests):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def test_every_request_gets_what_it_gets_alone(generator):
    cfg = generator.cfg
    engine = Engine(generator, slots=3, chunk=4, bucket=8)
    specs = [(3, 9), (11, 4), (6, 1), (20, 12), (2, 7), (14, 3), (9, 10)]  # (prompt tokens, max_tokens)
    requests, streamed = [], {}
    for i, (n, budget) in enumerate(specs):
        r = Request(_prompt(cfg, n, i), budget)
        streamed[id(r)] = []
        r.on_tokens = lambda ids, finish, key=id(r): streamed[key].extend(ids)
        requests.append(engine.submit(r))
    _run(engine, requests)
    for r, (n, budget) in zip(requests, specs):
        want, reason = _alone(generator, list(r.prompt), budget)
        assert r.tokens == want and r.finish_reason == reason
        assert streamed[id(r)] == want  # what the stream handed out, chunk by chunk
    assert engine.active == 0 and engine.queued == 0


def test_a_later_short_request_finishes_first(generator):
    cfg = generator.cfg
    engine = Engine(generator, slots=2, chunk=2, bucket=8, stop_tokens=())  # budgets decide the ends
    order = []
    long = Request(_prompt(cfg, 5, 1), 30, on_tokens=lambda ids, finish: finish and order.append("long"))
    engine.submit(long)
    engine.step()
    engine.step()
    assert long.finish_reason is None and len(long.tokens) >= 3
    short = Request(_prompt(cfg, 4, 2), 2, on_tokens=lambda ids, finish: finish and order.append("short"))
    engine.submit(short)
    _run(engine, [long, short])
    assert order == ["short", "long"] and len(long.tokens) == 30 and len(short.tokens) == 2


def test_cancelled_requests_free_their_slots(generator):
    cfg = generator.cfg
    engine = Engine(generator, slots=1, chunk=2, bucket=8, max_queue=2, stop_tokens=())  # only budgets end answers
    a = engine.submit(Request(_prompt(cfg, 5, 3), 40, sampling=Sampling(greedy=False, seed=1)))
    b = engine.submit(Request(_prompt(cfg, 6, 4), 3))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(Request(_prompt(cfg, 6, 5), 3))
    engine.step()
    assert engine.active == 1 and a.tokens
    engine.cancel(a)
    _run(engine, [a, b])
    assert a.finish_reason == "cancelled" and len(a.tokens) < 40
    assert b.finish_reason == "length" and b.tokens == _tokens(generator, b.prompt, 3)
    c = engine.submit(Request(_prompt(cfg, 6, 6), 3))
    engine.cancel(c)  # cancelled while waiting: never takes a slot
    assert not engine.step() and c.finish_reason == "cancelled" and engine.active == 0


def test_a_freed_slot_is_refilled_within_the_chunk(generator):
    """With a request waiting, a chunk ends when a slot frees: the waiting request starts
    after the short one's 3 tokens, not after the chunk's 16 steps."""
    cfg = generator.cfg
    engine = Engine(generator, slots=2, chunk=16, bucket=8, stop_tokens=())
    long = engine.submit(Request(_prompt(cfg, 5, 7), 40))
    short = engine.submit(Request(_prompt(cfg, 5, 8), 3))
    waiting = engine.submit(Request(_prompt(cfg, 5, 9), 4))
    engine.step()  # admits long and short; the chunk stops when short is done
    assert short.finish_reason == "length" and len(long.tokens) == 3 and waiting.finish_reason is None
    engine.step()  # admits the waiting request into short's slot; its 4 tokens fit this chunk
    assert waiting.finish_reason == "length" and long.finish_reason is None
    _run(engine, [long, waiting])
    assert waiting.tokens == _tokens(generator, waiting.prompt, 4)
    assert len(long.tokens) == 40
    lone = Engine(generator, slots=2, chunk=16, bucket=8, stop_tokens=())  # nothing waiting: the whole chunk runs
    a, b = lone.submit(Request(_prompt(cfg, 5, 7), 40)), lone.submit(Request(_prompt(cfg, 5, 8), 3))
    lone.step()
    assert b.finish_reason == "length" and len(a.tokens) == 17


def test_warm_compiles_every_program_a_request_needs(generator):
    cfg = generator.cfg
    engine = Engine(generator, slots=5, chunk=4, bucket=8, stop_tokens=())
    assert engine.row_counts() == [1, 2, 4, 5]
    engine.warm([7, 12])
    assert sorted(engine._prefill) == [8, 16] and engine.active == 0 and engine.stats["prefills"] == 2
    compiled = engine._decode._cache_size()
    specs = [(3, 2), (5, 20), (10, 6), (4, 10), (6, 14)]  # (prompt tokens, budget)
    requests = [engine.submit(Request(_prompt(cfg, n, i), b)) for i, (n, b) in enumerate(specs)]
    program, rows = engine._decode, []
    engine._decode = lambda *a: (rows.append(a[-1]), program(*a))[1]
    _run(engine, requests)
    assert set(rows) == {5, 4, 2, 1}  # the chunks ran on fewer rows as requests finished
    assert program._cache_size() == compiled == 4 and sorted(engine._prefill) == [8, 16]  # nothing new compiled
    for r, (_, b) in zip(requests, specs):
        assert r.tokens == _tokens(generator, r.prompt, b)


def test_chunks_are_short_while_a_slot_is_free(generator, monkeypatch):
    """While a slot is free a chunk lasts about ADMIT_WITHIN seconds (here: one step), so a
    request that arrives meanwhile is admitted after one step, not a whole chunk; with every
    slot busy, chunks are full."""
    from glm_jax.serving import engine as engine_module

    monkeypatch.setattr(engine_module, "ADMIT_WITHIN", 0.0)
    cfg = generator.cfg
    engine = Engine(generator, slots=2, chunk=8, bucket=8, stop_tokens=())
    first = engine.submit(Request(_prompt(cfg, 5, 10), 40))
    engine.step()  # no step time measured yet: a whole chunk
    assert len(first.tokens) == 9
    engine.step()
    assert len(first.tokens) == 10  # a slot is free: one step
    second = engine.submit(Request(_prompt(cfg, 5, 11), 30))
    engine.step()  # admitted at once; now both slots are busy: a whole chunk
    assert len(first.tokens) == 18 and len(second.tokens) == 9
    _run(engine, [first, second])
    assert first.tokens == _tokens(generator, first.prompt, 40)
    assert second.tokens == _tokens(generator, second.prompt, 30)


def test_max_len_bounds_prompt_and_answer(generator):
    from glm_jax.config import ConfigError
    from glm_jax.inference.decode import PromptError

    cfg = generator.cfg
    with pytest.raises(ConfigError, match=f"max_len=1: a slot holds 2 to {cfg.max_seq_len} tokens"):
        Engine(generator, max_len=1)
    engine = Engine(generator, slots=2, max_len=16)
    assert engine.length == 16 and engine.state.tokens.shape == (2, 16) and engine.state.cache.slots == 16
    with pytest.raises(PromptError, match="exceeds the model's maximum of 16"):
        engine.submit(Request(_prompt(cfg, 10, 0), 5))  # 12 prompt tokens + 5 > 16
    assert engine.queued == 0


def test_a_model_parallel_engine_gives_the_one_device_answers(generator):
    """Heads and MLP split over model=4: the slots' keys and values are split by heads, and
    every request gets the single-device answer; a mesh with data > 1 is refused."""
    import jax

    from glm_jax.config import ConfigError, MeshConfig
    from glm_jax.parallel.mesh import make_mesh

    cfg = variant("chatglm-6b")  # the fixture's weights (generator.cfg is the generation layout's config)
    sharded = Generator(cfg, random_params(cfg), mesh=make_mesh(MeshConfig(data=1, model=4), jax.devices()[:4]))
    engine = Engine(sharded, slots=2, chunk=4, bucket=8, stop_tokens=())
    k = engine.state.cache.k[0]
    assert k.sharding.shard_shape(k.shape)[1] == cfg.num_heads // 4 and k.sharding.shard_shape(k.shape)[0] == 2
    engine.warm([7])  # as serve does before it listens
    compiled = engine._decode._cache_size()
    specs = [(5, 12), (6, 3), (4, 9)]  # three requests over two slots: one waits, then takes a freed slot
    requests = [engine.submit(Request(_prompt(cfg, n, 20 + i), b)) for i, (n, b) in enumerate(specs)]
    _run(engine, requests)
    assert engine._decode._cache_size() == compiled == 2 and sorted(engine._prefill) == [8]  # the warmed programs
    assert engine._prefill[8]._cache_size() == engine._insert[8]._cache_size() == 1
    for r, (_, b) in zip(requests, specs):
        assert r.tokens == _tokens(generator, r.prompt, b)
    assert engine.state.cache.k[0].sharding == k.sharding  # laid out as it started, chunk after chunk
    with pytest.raises(ConfigError, match="model axis only .* build it with data=1"):
        Engine(Generator(cfg, random_params(cfg), mesh=make_mesh(MeshConfig(data=2, model=4))))
