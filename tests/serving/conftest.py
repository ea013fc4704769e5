"""A real server on 127.0.0.1 over a small ChatGLM-shaped model with its own vocabulary,
shared by the serving tests."""

import threading
import time

import pytest

from inference.inference_fixtures import random_params
from helpers import training_workdir, variant
from serving.serving_fixtures import free_port, model_flags

TEXT = "\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}. hello world!" for i in range(300))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    cfg = variant("chatglm-6b", max_seq_len=64)
    (d / "text.txt").write_text(TEXT)
    return training_workdir(d / "run", cfg, random_params(cfg), d / "text.txt")


@pytest.fixture(scope="session")
def served(workdir):
    """(base URL, LoadedModel, PromptText, Engine) of a running server: 4 slots, chunks of 4."""
    import uvicorn

    from glm_jax.inference import cli
    from glm_jax.serving.engine import Engine
    from glm_jax.serving.server import create_app

    model, text = cli.load_model_and_text(model_flags(workdir))
    engine = Engine(model.generator, slots=4, chunk=4, bucket=16, max_queue=64).start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, text, model_name="tiny-chat", default_max_tokens=8),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, text, engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()
