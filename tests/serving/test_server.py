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


def test_concurrent_streams_each_equal_the_request_alone(served):
    url, model, text, engine = served
    questions = [("hello", 3), ("the quick brown fox", 9), ("jumps over", 5), ("number 7", 12), ("lazy dog", 1),
                 ("hello world", 7), ("fox", 10), ("the", 4)] * 2
    results = [None] * len(questions)

    def one(i, q, n):
        chunks = client(url).chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": q}],
                                                     max_tokens=n, temperature=0, stream=True)
        results[i] = "".join(x.choices[0].delta.content or "" for x in chunks)

    threads = [threading.Thread(target=one, args=(i, q, n)) for i, (q, n) in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for (q, n), got in zip(questions, results):
        assert got == text.decode(alone(model, text.prompt_ids(chat_prompt([], q)), n)[0]), q
    health = httpx.get(url + "/health").json()
    assert health["active_slots"] == 0 and health["queued"] == 0 and health["status"] == "ok"


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
    for _ in range(100):
        health = httpx.get(url + "/health").json()
        if health["active_slots"] == 0 and cancelled:
            break
        time.sleep(0.1)
    assert health["active_slots"] == 0 and health["queued"] == 0
    assert cancelled and cancelled[0].finish_reason == "cancelled" and len(cancelled[0].tokens) < 50
