"""``python -m glm_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-queue Q]``:
serve a GLM model over HTTP with continuous batching.

OpenAI's ``/v1/chat/completions`` and ``/v1/completions`` (JSON, or server-sent events with
``stream: true``), ``/v1/models``, ``/health``, the authors' ``POST /`` (ChatGLM-6B's
``api.py`` body) and a chat page at ``/`` (``glm_jax.serving``). ``--max-batch`` KV-cache
slots decode together, ``--chunk`` tokens per compiled call; requests beyond the slots wait
in a queue of ``--max-queue`` (then 429). Model flags as ``generate``: ``--quantize``,
``--ptuning-checkpoint``, ``--lora-adapter``, ``--dtype``, ``--vocab``, and
``--model-parallel N`` (the model split over the first N devices).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from glm_jax.cli import run_main
from glm_jax.convert import lora_adapter, ptuning
from glm_jax.inference import cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m glm_jax.serve", description=__doc__.splitlines()[0])
    cli.add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--max-batch", type=int, default=8, help="KV-cache slots decoded together (default 8)")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    g.add_argument("--max-len", type=int, default=None,
                   help="tokens a slot holds, prompt and answer together (default: the model's max_seq_len); "
                        "the KV cache is max-batch x max-len tokens")
    g.add_argument("--chunk", type=int, default=8, help="tokens per compiled decoding call (default 8)")
    g.add_argument("--bucket", type=int, default=32, help="prompts are padded to a multiple of this (default 32)")
    g.add_argument("--max-tokens", type=int, default=256, help="answer budget when a request names none (default 256)")
    g.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the checkpoint's name)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for flag in ("max_batch", "chunk", "bucket", "max_tokens"):
        if getattr(args, flag) < 1:
            raise cli.UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0:
        raise cli.UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    # With --model-parallel N the model is split over N devices (axis model); the slots are not
    # split over data, so the mesh holds those N devices only.
    model, text = cli.load_model_and_text(args, read_prefix=ptuning.read, read_adapter=lora_adapter.read,
                                          data_parallel=False)
    # The web stack loads only once the model has: a bad flag or checkpoint fails fast.
    import uvicorn

    from glm_jax.serving.engine import Engine
    from glm_jax.serving.server import create_app

    engine = Engine(model.generator, slots=args.max_batch, chunk=args.chunk, bucket=args.bucket,
                    max_queue=args.max_queue, max_len=args.max_len)
    engine.warm(log=lambda line: print(f"glm_jax.serve: {line}", file=sys.stderr, flush=True)).start()
    name = args.model_name or model.config.name
    app = create_app(engine, text, model_name=name, default_max_tokens=args.max_tokens)
    print(f"glm_jax.serve: {name} on http://{args.host}:{args.port} ({args.max_batch} slots of {engine.length} tokens)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
