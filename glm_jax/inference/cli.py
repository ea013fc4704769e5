"""What ``python -m glm_jax.generate`` and ``python -m glm_jax.chat`` share: the model,
vocabulary and sampling flags, loading, and streaming an answer as text. Bad input
raises ``ConfigError`` subclasses, which ``glm_jax.cli.run_main`` prints as one line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from glm_jax.checkpoint import directory
from glm_jax.config import ConfigError, MeshConfig, load_config
from glm_jax.data.vocab import GLMVocabulary, default_vocabulary_path, load_sentencepiece
from glm_jax.inference.loading import load
from glm_jax.inference.sampling import Sampling
from glm_jax.inference.text import PromptText, until_stop


class UsageError(ConfigError):
    """Bad input from the user: ``glm_jax.cli.run_main`` prints it as one line, exit code 2."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a converted checkpoint (python -m glm_jax.convert) or a training workdir")
    g.add_argument("--vocab", default=None, help="SentencePiece model (ChatGLM-6B: ice_text.model); default: the one the "
                   "checkpoint's config names, else glm_jax's default vocabulary")
    g.add_argument("--vocab-id-offset", type=int, default=None, help="model id = piece id - offset (default: found from "
                   "the [gMASK] piece if the vocabulary has one, else the config's data.vocab_id_offset)")
    g.add_argument("--quantize", default=None, choices=["none", "int8", "int4"],
                   help="weight-only quantization of the four linears per layer (default: as stored); the matmuls read "
                   "the int8/int4 bytes, 4-8x fewer per token than float32")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype, and the dtype the other weights are held in (default: the checkpoint's); "
                   "on a CPU, bfloat16 halves the bytes read per token (weights streamed as bfloat16 bits)")
    g.add_argument("--model-parallel", type=int, default=1, help="split heads and MLP over this many devices (mesh axis model)")
    g.add_argument("--ptuning-checkpoint", default=None,
                   help="a P-tuning v2 prefix for the --checkpoint base: the authors' checkpoint directory (config.json "
                        "with pre_seq_len + pytorch_model.bin) or a glm_jax P-tuning run")
    g.add_argument("--lora-adapter", default=None,
                   help="LoRA adapters to merge into the --checkpoint base on load: a PEFT adapter directory "
                        "(adapter_config.json + adapter_model.safetensors) or a glm_jax LoRA run")


def add_sampling_args(parser: argparse.ArgumentParser, defaults: Sampling, max_new_tokens: int) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"token budget per answer (default {max_new_tokens})")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="greedy", action="store_false", default=defaults.greedy,
                      help="sample" + (" (default)" if not defaults.greedy else " instead of greedy decoding"))
    mode.add_argument("--greedy", dest="greedy", action="store_true", help="greedy decoding" + (" (default)" if defaults.greedy else ""))
    g.add_argument("--temperature", type=float, default=defaults.temperature, help=f"sampling temperature (default {defaults.temperature})")
    g.add_argument("--top-k", type=int, default=defaults.top_k, help=f"keep the k most likely tokens, 0 = off (default {defaults.top_k})")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help=f"nucleus sampling mass, 1 = off (default {defaults.top_p})")
    g.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                   help=f"CTRL/ChatGLM repetition penalty, 1 = off (default {defaults.repetition_penalty})")
    g.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")


def add_beam_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("beam search (GLM-130B's; deterministic)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams; 1 (default) = greedy or --sample")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="finished hypotheses score sum(log p) / ((5 + length) / 6) ** this (default 1.0)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size, 0 = off (default 0)")
    g.add_argument("--min-gen-length", type=int, default=0, help="no stop token before this many new tokens (default 0)")


def beam_options(args) -> dict:
    """The beam search options given on the command line ({} for --num-beams 1)."""
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams == 1:
        changed = [f for f, default in (("--length-penalty", 1.0), ("--no-repeat-ngram-size", 0), ("--min-gen-length", 0))
                   if getattr(args, f[2:].replace("-", "_")) != default]
        if changed:
            raise UsageError(f"{changed[0]} is a beam search option: add --num-beams N (N > 1)")
        return {}
    if not args.greedy:
        raise UsageError("beam search is deterministic: drop --sample")
    return dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, min_gen_length=args.min_gen_length)


def sampling_from_args(args) -> Sampling:
    return Sampling(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    ).validate()


def _vocab_offset(path: str, cfg, given: Optional[int], configured: int) -> int:
    if given is not None:
        return given
    sp = load_sentencepiece(path)
    pid = sp.piece_to_id("[gMASK]")
    if pid != sp.unk_id() and sp.id_to_piece(pid) == "[gMASK]":
        return pid - cfg.gmask_token_id
    return configured


def check_model_parallel(n: int, cfg) -> None:
    """Heads and the MLP must split evenly over ``n`` devices."""
    if cfg.num_heads % n or cfg.mlp_dim % n:
        valid = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and cfg.mlp_dim % d == 0]
        raise UsageError(f"--model-parallel {n} does not divide the model's {cfg.num_heads} attention heads and "
                         f"{cfg.mlp_dim} MLP units; valid values: {', '.join(map(str, valid))}")


def load_model_and_text(args, read_prefix=None, read_adapter=None, data_parallel=True):
    """(LoadedModel, PromptText) from the model flags; every problem is one clear line.
    With ``--model-parallel N`` the mesh splits the model N ways over ``model`` and, unless
    ``data_parallel`` is False, takes every device (the rest as ``data``); False builds it from
    the first N devices only (the server's slots are not split over ``data``).
    ``read_prefix(path, base config)``: reads ``--ptuning-checkpoint`` (the entry points pass
    ``glm_jax.convert.ptuning.read``); ``read_adapter`` likewise ``--lora-adapter``
    (``glm_jax.convert.lora_adapter.read``)."""
    ckpt = args.checkpoint
    if not os.path.isdir(ckpt):
        raise UsageError(f"--checkpoint {ckpt}: no such directory")
    cfg_file = load_config(os.path.join(ckpt, directory.CONFIG)) if os.path.isfile(os.path.join(ckpt, directory.CONFIG)) else None
    mesh = None
    if args.model_parallel > 1:
        from glm_jax.parallel.mesh import make_mesh  # builds a jax mesh: only with --model-parallel

        if cfg_file is not None:
            check_model_parallel(args.model_parallel, cfg_file.model)
        if data_parallel:
            mesh = make_mesh(MeshConfig(data=-1, model=args.model_parallel))
        else:
            import jax  # as make_mesh: only with --model-parallel

            if args.model_parallel > jax.device_count():
                raise UsageError(f"--model-parallel {args.model_parallel}: only {jax.device_count()} devices")
            mesh = make_mesh(MeshConfig(data=1, model=args.model_parallel), jax.devices()[: args.model_parallel])
    try:
        prefix = None
        if args.ptuning_checkpoint:
            prefix = lambda base: read_prefix(args.ptuning_checkpoint, base)  # noqa: E731
        adapter = None
        if args.lora_adapter:
            adapter = lambda base: read_adapter(args.lora_adapter, base)  # noqa: E731
        model = load(ckpt, dtype=args.dtype, quantize=args.quantize, mesh=mesh, prefix=prefix, adapter=adapter)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    cfg = model.config
    path = args.vocab or (cfg_file.data.vocab if cfg_file else None)
    if path is None:
        if os.path.exists(os.path.join(ckpt, directory.HF_SOURCE)):
            raise UsageError(f"{ckpt} was converted from Hugging Face: pass its vocabulary with --vocab (ChatGLM-6B: ice_text.model)")
        print("glm_jax: no --vocab given; using glm_jax's default vocabulary (built once and cached)", file=sys.stderr)
        path = default_vocabulary_path(cfg)
    if not os.path.isfile(path):
        raise UsageError(f"--vocab {path}: no such file")
    offset = _vocab_offset(path, cfg, args.vocab_id_offset, cfg_file.data.vocab_id_offset if cfg_file else 0)
    return model, PromptText(GLMVocabulary(path, cfg, offset))


def stream_answer(model, text, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, *, chunk: int = 4,
                  bucket: int = 1, out=None):
    """Generate for one prompt, writing the answer's text to ``out`` as it grows (nothing
    if None). Returns (answer text, answer ids without the stop token). ``bucket``: see
    ``LoadedModel.generate``."""
    stops = model.generator.stop_tokens
    ids: list[int] = []
    shown = ""
    for block in model.stream([prompt_ids], max_new_tokens, sampling, chunk=chunk, bucket=bucket):
        ids.extend(int(t) for t in block[0])
        now = text.decode(until_stop(ids, stops))
        if out is not None:
            out.write(now[len(shown):])
            out.flush()
        shown = now
    if out is not None:
        out.write("\n")
        out.flush()
    return shown, until_stop(ids, stops)
