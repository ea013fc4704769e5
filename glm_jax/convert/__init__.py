"""Checkpoint converters: the authors' formats <-> glm_jax's orbax checkpoints.

    python -m glm_jax.convert from-hf --src HF_DIR --dst OUT_DIR
    python -m glm_jax.convert to-hf --src OUT_DIR --dst HF_DIR
    python -m glm_jax.convert from-sat --src SAT_DIR --dst OUT_DIR [--config FILE] [key=value ...]
    python -m glm_jax.convert to-sat --src OUT_DIR --dst SAT_DIR --tp N

``layout`` is the single statement of how glm_jax's parameters map to the authors'
state-dict keys and layouts, in both directions (``sat_layout`` adds how SAT checkpoints
split each tensor over tensor-parallel ranks); the rest streams tensors through it
block by block so that memory stays bounded whatever the checkpoint's size. Importing
this package does not import jax or torch: torch and safetensors (the ``convert`` extra)
are imported inside the functions that read or write the authors' files, and the CLI
imports each subcommand's module only when it runs.
"""

from glm_jax.convert.errors import ConvertError
from glm_jax.checkpoint.authors_layout import entries, from_authors, to_authors

__all__ = ["ConvertError", "entries", "from_authors", "to_authors"]
