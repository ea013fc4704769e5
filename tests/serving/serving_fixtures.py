"""Helpers the serving tests share (a module of its own: every test folder has a
``conftest``, so ``from conftest import ...`` finds whichever was imported first)."""

import argparse
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_flags(checkpoint, **flags):
    """The model flags of ``serve`` / ``generate`` (``inference.cli.add_model_args``) as parsed."""
    defaults = dict(checkpoint=str(checkpoint), vocab=None, vocab_id_offset=None, quantize=None, dtype=None,
                    model_parallel=1, ptuning_checkpoint=None, lora_adapter=None)
    return argparse.Namespace(**{**defaults, **flags})
