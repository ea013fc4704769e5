"""``python -m glm_jax.data.build_vocab --input FILES --vocab-size N --output PATH``

Trains a SentencePiece model on local text files (one document or sentence per line;
globs allowed). GLM's special tokens are not pieces of it: glm_jax appends them after
the ordinary pieces at the ids the model config names, so pick N no larger than the
config's first special-token id (1000 for glm-tiny).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
from typing import Optional, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from glm_jax import cli
from glm_jax.config import ConfigError
from glm_jax.data.corpus import unescape


def expand(patterns: Sequence[str]) -> list[str]:
    files = []
    for p in patterns:
        hits = sorted(glob.glob(p))
        if not hits:
            raise ConfigError(f"no file matches {p}")
        files.extend(hits)
    return files


def train(files: Sequence[str], vocab_size: int, output: str, *, model_type: str = "unigram", escaped: bool = False) -> str:
    """Train deterministically (fixed input order, single thread) and write ``output``."""
    if vocab_size < 16:
        raise ConfigError(f"--vocab-size must be >= 16, got {vocab_size}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "input.txt")
        with open(text, "w", encoding="utf-8") as out:
            for path in files:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        line = unescape(line.rstrip("\n")) if escaped else line.rstrip("\n")
                        for sentence in line.split("\n"):
                            if sentence.strip():
                                out.write(sentence + "\n")
        prefix = os.path.join(tmp, "sp")
        try:
            _train_sp(spm, text, prefix, vocab_size, model_type)
        except RuntimeError as e:  # e.g. a vocabulary larger than the text supports
            raise ConfigError(f"sentencepiece: {str(e).strip().splitlines()[0]}") from None
        proto = sentencepiece_model_pb2.ModelProto()
        with open(prefix + ".model", "rb") as src:
            proto.ParseFromString(src.read())
        # The trainer spec records the temporary paths; drop them so equal inputs give equal bytes.
        del proto.trainer_spec.input[:]
        proto.trainer_spec.model_prefix = ""
        tmp_out = output + f".tmp{os.getpid()}"
        with open(tmp_out, "wb") as dst:
            dst.write(proto.SerializeToString())
        os.replace(tmp_out, output)
    return output


def _train_sp(spm, text: str, prefix: str, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        input_sentence_size=2_000_000,
        minloglevel=2,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.data.build_vocab", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files or globs, one document per line")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of SentencePiece pieces")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    args = parser.parse_args(argv)
    files = expand(args.input)
    print(f"training a {args.vocab_size}-piece {args.model_type} model on {len(files)} file(s)", file=sys.stderr)
    train(files, args.vocab_size, args.output, model_type=args.model_type)
    print(args.output)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
