"""``python -m glm_jax.chat --checkpoint DIR [--vocab PATH]``: chat with ChatGLM-6B-style models.

Reads one query per line from stdin and streams the answer as it is generated, with
ChatGLM-6B's multi-round prompt (``[Round i]\\n问：…\\n答：…``, MODEL.md §2.3) and its
``chat()`` sampling defaults (top-p 0.7, temperature 0.95, top-k 50). ``clear`` starts a
new conversation, ``exit`` or end of input leaves. When the conversation no longer fits
the model's maximum length, the oldest rounds are dropped (Part A is bidirectional, so
nothing of an earlier round's cache could be reused anyway: each answer is one prefill
of the whole conversation, then cached decoding).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from glm_jax.cli import run_main
from glm_jax.convert import lora_adapter, ptuning
from glm_jax.inference import cli
from glm_jax.inference.sampling import CHATGLM_CHAT
from glm_jax.data.chat import chat_prompt

STREAM_CHUNK = 4  # tokens per device call while streaming
# The prompt (history + query) grows every round; left-padded to a multiple of this, rounds
# share a compiled program instead of compiling one per length (seconds for a deep model).
PROMPT_BUCKET = 64


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m glm_jax.chat", description="Chat with a ChatGLM-6B-style model, answers streamed as they are generated.")
    cli.add_model_args(parser)
    cli.add_sampling_args(parser, CHATGLM_CHAT, max_new_tokens=512)
    parser.add_argument("--quiet", action="store_true", help="no prompts or banner, answers only (for piping)")
    return parser.parse_args(argv)


def fit(text, history: list, query: str, max_new_tokens: int) -> tuple[list[int], int, int]:
    """The prompt ids, the new-token budget and how many old rounds had to be dropped."""
    cfg = text.cfg
    dropped = 0
    while True:
        ids = text.prompt_ids(chat_prompt(history[dropped:], query))
        room = cfg.max_seq_len - len(ids)
        if room >= min(max_new_tokens, 16) or dropped == len(history):
            return ids, min(max_new_tokens, room), dropped
        dropped += 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise cli.UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = cli.sampling_from_args(args)
    model, text = cli.load_model_and_text(args, read_prefix=ptuning.read, read_adapter=lora_adapter.read)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"glm_jax chat: {model.config.name}; 'clear' starts over, 'exit' leaves")
    history: list[tuple[str, str]] = []
    while True:
        if not args.quiet:
            print("\n用户：", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        query = line.rstrip("\n")
        if query.strip() == "exit":
            return 0
        if query.strip() == "clear":
            history = []
            say("(conversation cleared)")
            continue
        if not query.strip():
            continue
        ids, budget, dropped = fit(text, history, query, args.max_new_tokens)
        if budget < 1:
            say(f"error: the query alone is {len(ids)} tokens, more than the model's maximum of {model.config.max_seq_len}")
            continue
        history = history[dropped:]
        if dropped:
            say(f"(dropped the {dropped} oldest round(s) to fit {model.config.max_seq_len} tokens)")
        if not args.quiet:
            print("ChatGLM：", end="", file=sys.stderr, flush=True)
        shown, _ = cli.stream_answer(model, text, ids, budget, sampling, chunk=STREAM_CHUNK, bucket=PROMPT_BUCKET, out=sys.stdout)
        history.append((query, shown))


if __name__ == "__main__":
    run_main(main)
