"""Serving throughput and time to first token under concurrent streaming clients.

    python -m glm_jax.bench serve --json [--preset glm-tiny|chatglm-6b-2l|all] [--dtype float32]
        [--clients 1,4,16,64] [--requests 64] [--prompt-len 16,96] [--max-tokens 32,128]
        [--max-len 256] [--chunk 8] [--bucket 16] [--seed 0]

For each preset (random weights, as ``bench decode``'s presets) and each number of clients
``c``, a real server (``glm_jax.serving``: FastAPI on uvicorn over the continuous-batching
engine, ``c`` KV-cache slots of ``--max-len`` tokens) runs on 127.0.0.1, and ``c`` streaming
clients (httpx, ``POST /v1/completions`` with ``stream: true``) share the same
``--requests`` requests: each client sends its next request as soon as its last one has
finished, so ``c`` requests are in flight until the queue runs dry. Every level serves the
same requests, greedy (``temperature: 0``): prompts of random token ids with lengths
uniform in ``--prompt-len`` and ``max_tokens`` uniform in ``--max-tokens``, drawn from
``--seed``. The prompts are sent as token ids, so no tokenizer is needed; the answer text is
the ids written out.

``c = 1`` is the same requests served one at a time, the baseline. Per level:

* ``tokens_per_s``: generated tokens (the ``usage`` of each stream's last chunk) over the
  level's wall time, from the first request sent to the last stream closed;
* ``ttft_p50_s`` / ``ttft_p99_s``: time from sending a request to its first streamed text,
  queueing included (a request waits for a free slot when all ``c`` are busy, which with
  ``c`` clients happens only between one request's end and the next one's admission);
* ``speedup``: ``tokens_per_s`` over the one-at-a-time level's (same run, same load);
* ``full_tokens_per_s`` and ``full_speedup``: the same over ``full_seconds``, the time until
  the first client found no request left to send. Until then all ``c`` clients had a request
  in flight; after it, the last wave drains with fewer, so ``tokens_per_s`` mixes in lower
  concurrencies (with 64 requests over 16 clients, about a quarter of the steps). Tokens
  count in the window when their streamed text arrives in it. At one client both are the
  whole run;
* ``answers_differing``: requests whose answer differs from the one-at-a-time answer
  (batched float sums may round differently; 0 expected);
* where the engine's time went: ``prefill_share`` and ``decode_share`` of the wall time
  (the rest is the host: HTTP, streaming, admission), ``decode_steps_per_s`` and
  ``rows_per_step`` (tokens decoded per step: how full the slots were).

Compilation is not timed: each level's engine compiles its programs before it starts (``Engine.warm``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import statistics
import sys
import threading
import time
from typing import Optional, Sequence

from glm_jax import cli
from glm_jax.bench.decode import PRESETS, _list, preset_model, random_params


class IdText:
    """The server's text for a model without a tokenizer: answers are ids written out."""

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" {int(i)}" for i in ids)

    def prompt_ids(self, text: str) -> list[int]:
        raise cli.ConfigError("this benchmark server takes prompts as token ids")


@dataclasses.dataclass
class Job:
    prompt: list[int]
    max_tokens: int


def make_jobs(cfg, n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int) -> list[Job]:
    import numpy as np

    rng = np.random.default_rng(seed)
    top = min(cfg.mask_token_id, cfg.vocab_size, 20000)
    jobs = []
    for _ in range(n):
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        jobs.append(Job([int(t) for t in rng.integers(5, top, length)], int(rng.integers(max_tokens[0], max_tokens[1] + 1))))
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real server on 127.0.0.1 in this process: uvicorn in a thread, over its engine."""

    def __init__(self, generator, slots: int, args, jobs: Sequence[Job]):
        # The web stack loads when a level runs, as jax does: `bench` starts without either.
        import uvicorn

        from glm_jax.serving.engine import Engine
        from glm_jax.serving.server import create_app

        self.engine = Engine(generator, slots=slots, chunk=args.chunk, bucket=args.bucket, max_queue=max(64, args.requests),
                             max_len=args.max_len)
        # Compilation is not timed: every decoding program and every prompt bucket's prefill.
        self.engine.warm([len(job.prompt) + 2 for job in jobs]).start()
        self.url = f"http://127.0.0.1:{_free_port()}"
        config = uvicorn.Config(create_app(self.engine, IdText(), model_name="bench"), host="127.0.0.1",
                                port=int(self.url.rsplit(":", 1)[1]), log_level="warning", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


async def _one(client, url: str, job: Job) -> dict:
    body = {"model": "bench", "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, parts, usage, arrivals = None, [], None, []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    now = time.perf_counter()
                    first = first or now
                    parts.append(choice["text"])
                    arrivals.append((now, len(choice["text"].split())))  # IdText: one " id" per token
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "tokens": usage["completion_tokens"], "text": "".join(parts),
            "arrivals": arrivals}


async def _clients(url: str, jobs: Sequence[Job], clients: int) -> tuple[float, float, float, list[dict]]:
    """Run the clients; returns the start, the moment the first client found no request left
    to send (until then all ``clients`` had one in flight), the end, and each request's result."""
    import httpx

    pending = list(enumerate(jobs))
    results: list = [None] * len(jobs)
    ran_dry: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def worker():
            while pending:
                i, job = pending.pop(0)
                results[i] = await _one(client, url, job)
            ran_dry.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return start, min(ran_dry), time.perf_counter(), results


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_preset(name: str, args, levels: Sequence[int]) -> list[dict]:
    from glm_jax.inference.decode import Generator

    cfg = preset_model(name, args.dtype)
    max_len = min(args.max_len, cfg.max_seq_len)
    if args.prompt_len[1] + 2 + args.max_tokens[1] > max_len:
        raise cli.ConfigError(f"--prompt-len up to {args.prompt_len[1]} (+2 for [gMASK] <sop>) and --max-tokens up to "
                              f"{args.max_tokens[1]} do not fit --max-len {max_len}")
    generator = Generator(cfg, random_params(cfg))
    jobs = make_jobs(cfg, args.requests, args.prompt_len, args.max_tokens, args.seed)
    run_args = argparse.Namespace(**{**vars(args), "max_len": max_len})
    rows, base = [], None
    for clients in levels:
        print(f"bench serve: {name} {args.dtype}, {clients} client(s), {len(jobs)} requests", file=sys.stderr, flush=True)
        server = Server(generator, clients, run_args, jobs)
        try:
            before = dict(server.engine.stats)
            start, dry, end, results = asyncio.run(_clients(server.url, jobs, clients))
            leaked = server.engine.active + server.engine.queued
            stats = {k: v - before[k] for k, v in server.engine.stats.items()}
        finally:
            server.close()
        wall = end - start
        tokens = sum(r["tokens"] for r in results)
        ttft = [r["ttft"] for r in results]
        # Until the first client ran out of requests, all ``clients`` were in flight: the rate
        # at this concurrency, without the last wave draining.
        full = sum(n for r in results for at, n in r["arrivals"] if at <= dry)
        row = {"preset": name, "dtype": args.dtype, "clients": clients, "slots": clients, "requests": len(jobs),
               "generated_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
               "requests_per_s": len(jobs) / wall, "full_seconds": dry - start, "full_tokens": full,
               "full_tokens_per_s": full / max(dry - start, 1e-9), "ttft_p50_s": statistics.median(ttft),
               "ttft_p99_s": _quantile(ttft, 0.99), "slots_left_busy": leaked,
               "prefill_share": stats["prefill_s"] / wall, "decode_share": stats["decode_s"] / wall,
               "decode_steps_per_s": stats["steps"] / max(stats["decode_s"], 1e-9),
               "rows_per_step": stats["decoded"] / max(stats["steps"], 1)}
        if base is None and clients == 1:
            base = (row, [r["text"] for r in results])
        if base is not None:
            row["speedup"] = row["tokens_per_s"] / base[0]["tokens_per_s"]
            row["full_speedup"] = row["full_tokens_per_s"] / base[0]["tokens_per_s"]
            row["ttft_p50_ratio"] = row["ttft_p50_s"] / base[0]["ttft_p50_s"]
            row["answers_differing"] = sum(a != r["text"] for a, r in zip(base[1], results))
        print(f"{name:>14} {args.dtype} c={clients}: {row['tokens_per_s']:,.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.3f} s "
              f"p99 {row['ttft_p99_s']:.3f} s" + (f", {row['speedup']:.2f}x one at a time ({row['full_speedup']:.2f}x "
                                                    f"while all {clients} were in flight)" if "speedup" in row else ""),
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _range(value: str, what: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(","))
    except ValueError:
        raise cli.ConfigError(f"--{what} {value!r}: give MIN,MAX (two integers)") from None
    if not 1 <= lo <= hi:
        raise cli.ConfigError(f"--{what} {value!r}: need 1 <= MIN <= MAX")
    return lo, hi


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glm_jax.bench serve", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[6:]),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--preset", default="all", help=f"one of {', '.join(PRESETS)}, all (default all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights and compute (default float32: XLA's CPU backend multiplies bfloat16 batches slowly)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrent clients (default 1,4,16,64; "
                        "1 is the one-at-a-time baseline)")
    parser.add_argument("--requests", type=int, default=64, help="requests every level serves (default 64)")
    parser.add_argument("--prompt-len", default="16,96", help="MIN,MAX prompt tokens (default 16,96)")
    parser.add_argument("--max-tokens", default="32,128", help="MIN,MAX max_tokens of a request (default 32,128)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per slot, prompt and answer (default 256, "
                        "at most the model's max_seq_len)")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per compiled decoding call (default 8)")
    parser.add_argument("--bucket", type=int, default=16, help="prompt padding multiple (default 16: on a CPU a prefill "
                        "costs about its padded length, and each multiple is one program, compiled before timing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests (default 0)")
    args = parser.parse_args(argv)
    presets = PRESETS if args.preset == "all" else (args.preset,)
    for p in presets:
        preset_model(p, "float32")  # validates the name
    levels = _list(args.clients, range(1, 1 << 12), "clients", int)
    args.prompt_len, args.max_tokens = _range(args.prompt_len, "prompt-len"), _range(args.max_tokens, "max-tokens")
    if args.requests < 1 or args.chunk < 1 or args.bucket < 1:
        raise cli.ConfigError("--requests, --chunk and --bucket must be >= 1")
    if max(levels) > args.requests:
        print(f"bench serve: {max(levels)} clients but {args.requests} requests: at most {args.requests} are ever in flight",
              file=sys.stderr)

    import jax

    rows = []
    for p in presets:
        rows.extend(bench_preset(p, args, levels))
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "preset")}, "results": rows}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
