"""``python -m glm_jax.generate --checkpoint DIR --prompt TEXT [...]``: continue text with a GLM model.

Each ``--prompt`` is one example of the batch. A prompt without a mask token becomes
``TEXT [gMASK] <sop>`` (ChatGLM-6B's and GLM-130B's prompt) and is continued; a prompt
with ``[MASK]`` or ``[sMASK]`` is blank filling (GLM-130B): every blank is filled, left
to right. Greedy unless ``--sample``, or a beam search with ``--num-beams N``
(GLM-130B's: ``--length-penalty``, ``--no-repeat-ngram-size``, ``--min-gen-length``). Weights can be quantized on load
(``--quantize int8|int4``). The answers go to stdout, one per prompt (``--json``: one JSON
object per prompt with the ids); ``--stream`` prints the first prompt's answer as it is
generated. Bad input (empty prompt, too long, a vocabulary that does not fit the
checkpoint) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from glm_jax.cli import run_main
from glm_jax.convert import lora_adapter, ptuning
from glm_jax.inference import cli
from glm_jax.inference.sampling import Sampling
from glm_jax.inference.text import until_stop


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m glm_jax.generate", description="Continue text or fill blanks with a GLM model (KV-cache generation with the authors' prompt rules).")
    cli.add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    cli.add_sampling_args(parser, Sampling(), max_new_tokens=64)
    cli.add_beam_args(parser)
    parser.add_argument("--stream", action="store_true", help="print the answer of a single prompt as it is produced")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, answer, ids")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for i, p in enumerate(args.prompt):
        if not p.strip():
            raise cli.UsageError(f"--prompt {i + 1} is empty")
    if args.max_new_tokens < 1:
        raise cli.UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.stream and len(args.prompt) != 1:
        raise cli.UsageError("--stream prints one answer as it is generated: give a single --prompt")
    sampling = cli.sampling_from_args(args)
    beams = cli.beam_options(args)
    if beams and args.stream:
        raise cli.UsageError("--stream shows tokens as they are chosen; a beam search knows its answer only at the end")
    model, text = cli.load_model_and_text(args, read_prefix=ptuning.read, read_adapter=lora_adapter.read)
    stops = model.generator.stop_tokens

    results = []
    blanks = [text.has_blanks(p) for p in args.prompt]
    if any(blanks) and not all(blanks):
        raise cli.UsageError("mix of blank-filling prompts ([MASK]/[sMASK]) and continuation prompts: run them separately")
    if all(blanks):
        if beams:
            raise cli.UsageError("--num-beams continues [gMASK] prompts; blank filling ([MASK]/[sMASK]) is greedy or sampled")
        rows = [text.blank_row(p) for p in args.prompt]
        filled, answers = model.fill_blanks(rows, args.max_new_tokens, sampling)
        for p, row, ans in zip(args.prompt, filled, answers):
            if row and row[-1] == model.config.eos_token_id:  # GLM-130B's marker after a mid-text blank
                row = row[:-1]
            results.append({"prompt": p, "answer": text.decode(row), "blanks": [text.decode(a) for a in ans], "ids": row})
    else:
        prompts = [text.prompt_ids(p) for p in args.prompt]
        room = model.config.max_seq_len - max(len(p) for p in prompts)
        if 0 < room < args.max_new_tokens:
            print(f"glm_jax: generating {room} tokens, all that fit model.max_seq_len={model.config.max_seq_len}", file=sys.stderr)
            args.max_new_tokens = room
        if args.stream:
            answer, ids = cli.stream_answer(model, text, prompts[0], args.max_new_tokens, sampling, out=None if args.json else sys.stdout)
            results.append({"prompt": args.prompt[0], "answer": answer, "ids": ids})
        else:
            if beams:
                out = model.generate(prompts, args.max_new_tokens, **beams)[:, -args.max_new_tokens:]
            else:
                out = model.generate(prompts, args.max_new_tokens, sampling)[:, -args.max_new_tokens:]
            for p, row in zip(args.prompt, out):
                ids = until_stop(row, stops)
                results.append({"prompt": p, "answer": text.decode(ids), "ids": ids})
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        elif not args.stream:
            print(r["answer"])
    return 0


if __name__ == "__main__":
    run_main(main)
