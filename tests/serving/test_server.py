"""The server as clients use it: the official openai client (chat and completions, JSON and
streamed), the authors' POST /, bad input as 400/429, many concurrent streams each equal
to its request served alone, and a client that leaves frees its slot."""

import json
import threading
import time

import httpx
import pytest

from glm_jax.data.chat import chat_prompt

openai = pytest.importorskip("openai")


def alone(model, ids, n):
    """The greedy answer of ``ids`` by itself (LoadedModel.generate), and why it ended."""
    row = model.generate([ids], n)[0, -n:].tolist()
    stops = model.generator.stop_tokens
    end = next((i for i, t in enumerate(row) if t in stops), None)
    return (row[:end], "stop") if end is not None else (row, "length")


def idle_health(url, until=lambda: True, timeout=60):
    """/health once no slot is active and nothing waits (and ``until()`` holds), or at the timeout."""
    deadline = time.time() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        if (health["active_slots"] == 0 and health["queued"] == 0 and until()) or time.time() > deadline:
            return health
        time.sleep(0.1)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_completions_and_chat_with_the_openai_client(served):
    url, model, text, engine = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-chat"]

    ids = text.prompt_ids("the quick brown")
    want, reason = alone(model, ids, 6)
    r = c.completions.create(model="tiny-chat", prompt="the quick brown", max_tokens=6, temperature=0)
    assert r.choices[0].text == text.decode(want) and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    streamed = c.completions.create(model="tiny-chat", prompt="the quick brown", max_tokens=6, temperature=0, stream=True)
    assert "".join(x.choices[0].text for x in streamed) == text.decode(want)

    history = [("hello", "world")]
    ids = text.prompt_ids(chat_prompt(history, "the fox"))
    want, reason = alone(model, ids, 7)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "the fox"}]
    r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=7, temperature=0)
    assert r.choices[0].message.content == text.decode(want) and r.choices[0].finish_reason == reason
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=7, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == reason
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == text.decode(want)

    answer = text.decode(alone(model, text.prompt_ids("hello"), 8)[0])
    cut = c.completions.create(model="tiny-chat", prompt="hello", max_tokens=8, temperature=0, stop=[answer[2:4]])
    if answer[2:4]:
        assert cut.choices[0].text == answer[: answer.find(answer[2:4])] and cut.choices[0].finish_reason == "stop"
    sampled = c.completions.create(model="tiny-chat", prompt="hello", max_tokens=8, temperature=0.9, top_p=0.8, seed=3)
    again = c.completions.create(model="tiny-chat", prompt="hello", max_tokens=8, temperature=0.9, top_p=0.8, seed=3)
    assert sampled.choices[0].text == again.choices[0].text  # a seed fixes a sampled answer


def test_the_authors_post_body(served):
    url, model, text, engine = served
    want = text.decode(alone(model, text.prompt_ids(chat_prompt([("hello", "world")], "the fox")), 20)[0])
    r = httpx.post(url + "/", json={"prompt": "the fox", "history": [["hello", "world"]], "max_length": 64,
                                    "temperature": 0}, timeout=60).json()
    n = 64 - len(text.prompt_ids(chat_prompt([("hello", "world")], "the fox")))
    want = text.decode(alone(model, text.prompt_ids(chat_prompt([("hello", "world")], "the fox")), n)[0])
    assert r["status"] == 200 and r["response"] == want
    assert r["history"] == [["hello", "world"], ["the fox", want]]


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "the quick brown fox " * 20, "max_tokens": 4}, 400, "the prompt is"),
    ({"prompt": "hello", "max_tokens": 60}, 400, "max_tokens=60, but the prompt of"),
    ({"prompt": "hello", "n": 2}, 400, "n=2"),
    ({"prompt": "hello", "temperature": -1}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt"),
])
def test_bad_requests_are_400_with_a_message(served, body, status, message):
    url, *_ = served
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_a_full_queue_is_429(served):
    from fastapi.testclient import TestClient

    from glm_jax.serving.engine import Engine
    from glm_jax.serving.server import create_app

    _, model, text, _ = served
    idle = Engine(model.generator, slots=1, max_queue=0)  # not started: nothing is ever admitted
    r = TestClient(create_app(idle, text)).post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 429 and "busy" in r.json()["error"]["message"]


def test_64_concurrent_streams_each_equal_the_request_alone(served, monkeypatch):
    """64 streaming clients at once on 4 slots: 56 read their answers to the end (mixed
    prompt lengths and max_tokens, chat and completions), 8 leave after their first chunk.
    Every answer equals its request served alone, the leavers are cancelled, and no slot or
    queue entry is left."""
    import asyncio

    url, model, text, engine = served
    submitted = []
    real = engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: (submitted.append(r), real(r))[1])
    questions = ["hello", "the quick brown fox", "jumps over the lazy dog number 7", "fox", "the",
                 "hello world! the quick brown fox 3 jumps", "number 14", "lazy dog. hello"]
    budgets = [1, 3, 6, 10]
    staying = [(questions[i % 8], budgets[(i // 8 + i) % 4], "chat" if i % 3 else "completions") for i in range(56)]
    leaving = [(f"leave {i}", 40, "completions") for i in range(8)]
    leaver_ids = {tuple(text.prompt_ids(q)) for q, _, _ in leaving}

    async def one(client, q, n, kind, leave):
        if kind == "chat":
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": q}]}
        else:
            path, body = "/v1/completions", {"prompt": q}
        body.update(model="tiny-chat", max_tokens=n, temperature=0, stream=True)
        parts, finish = [], None
        async with client.stream("POST", url + path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if leave:
                    return None  # the connection closes with the stream still open
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                parts.append(choice["delta"].get("content") or "" if kind == "chat" else choice["text"])
                finish = choice["finish_reason"] or finish
        return "".join(parts), finish

    async def everyone():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c, q, n, k, False) for q, n, k in staying),
                                        *(one(c, q, n, k, True) for q, n, k in leaving))

    results = asyncio.run(everyone())
    longest = {}  # greedy: a budget's answer is the first tokens of the longest budget's
    for (q, n, kind), got in zip(staying, results):
        ids = tuple(text.prompt_ids(chat_prompt([], q) if kind == "chat" else q))
        if ids not in longest:
            longest[ids] = alone(model, list(ids), max(budgets))
        tokens, reason = longest[ids]
        want = (tokens, reason) if len(tokens) < n else (tokens[:n], "length")
        assert got == (text.decode(want[0]), want[1]), (q, n, kind)
    health = idle_health(url)
    assert health["active_slots"] == 0 and health["queued"] == 0 and health["status"] == "ok"
    left = [r for r in submitted if tuple(r.prompt) in leaver_ids]
    assert len(left) == len(leaving) and len(submitted) == 64
    # A leaver stops where the server notices it go (unless its 40 tokens were out by then).
    assert sum(r.finish_reason == "cancelled" for r in left) >= len(leaving) // 2, [r.finish_reason for r in left]


def test_a_client_that_leaves_frees_its_slot(served, monkeypatch):
    url, model, text, engine = served
    import numpy as np

    cancelled = []
    real = engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda r: (cancelled.append(r), real(r)))
    monkeypatch.setattr(engine, "stops", ())  # nothing ends the answer early: only the client leaving can
    monkeypatch.setattr(engine, "_stops", np.zeros((0,), np.int32))
    body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 50, "temperature": 0.9, "seed": 1, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    health = idle_health(url, until=lambda: bool(cancelled))
    assert health["active_slots"] == 0 and health["queued"] == 0
    assert cancelled and cancelled[0].finish_reason == "cancelled" and len(cancelled[0].tokens) < 50


def test_token_id_prompts_and_usage_in_the_stream(served):
    """A prompt of token ids is the text's encoding (the same answer as the text); with
    include_usage the stream's last chunk carries the token counts and no choices."""
    url, model, text, engine = served
    c = client(url)
    ids = text.prompt_ids("the quick brown")
    encoded = text.encode("the quick brown")
    assert ids == encoded + [model.config.gmask_token_id, model.config.sop_token_id]
    want, reason = alone(model, ids, 6)
    r = c.completions.create(model="tiny-chat", prompt=encoded, max_tokens=6, temperature=0)
    assert r.choices[0].text == text.decode(want) and r.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model="tiny-chat", prompt="the quick brown", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert chunks[-1].usage.prompt_tokens == len(ids) and all(x.usage is None for x in chunks[:-1])
    assert "".join(x.choices[0].text for x in chunks[:-1]) == text.decode(want)
    bad = httpx.post(url + "/v1/completions", json={"prompt": [5, 10**7], "max_tokens": 2}, timeout=60)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    empty = httpx.post(url + "/v1/completions", json={"prompt": [], "max_tokens": 2}, timeout=60)
    assert empty.status_code == 400 and "prompt is empty" in empty.json()["error"]["message"]


def test_the_servers_model_parallel_mesh_holds_only_its_devices(workdir):
    """``serve --model-parallel N`` loads the model on the first N devices (data=1: the engine
    does not split its slots over data)."""
    from serving.serving_fixtures import model_flags
    from glm_jax.inference import cli

    model = cli.load_model_and_text(model_flags(workdir, model_parallel=2), data_parallel=False)[0]
    assert dict(model.mesh.shape) == {"data": 1, "pipe": 1, "model": 2} and model.mesh.devices.size == 2


def test_the_serve_command_with_model_parallel(served, workdir):
    """``python -m glm_jax.serve`` as a user starts it, the model split over two of eight
    devices: it logs its warm-up and address, answers the openai client with the one-device
    greedy answer, and stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from serving.serving_fixtures import free_port

    _, model, text, _ = served
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "glm_jax.serve", "--checkpoint", str(workdir), "--port", str(port),
                             "--max-batch", "2", "--max-len", "48", "--model-parallel", "2"],
                            cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    log: list = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.time() + 180
        while not any(f"on http://127.0.0.1:{port}" in line for line in log):
            assert proc.poll() is None and time.time() < deadline, "".join(log)
            time.sleep(0.1)
        assert any("compiling the decoding chunk for 2 slot(s)" in line for line in log), "".join(log)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # uvicorn binds just after the line above
            try:
                httpx.get(url + "/health")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        want, reason = alone(model, text.prompt_ids("the lazy dog"), 6)
        r = client(url).completions.create(model="m", prompt="the lazy dog", max_tokens=6, temperature=0)
        assert r.choices[0].text == text.decode(want) and r.choices[0].finish_reason == reason
        assert httpx.get(url + "/health").json()["active_slots"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # uvicorn shuts down, then raises the signal it caught again, so the exit status is SIGTERM's.
    assert proc.returncode == -signal.SIGTERM
