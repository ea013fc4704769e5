"""Which parameters a run trains (``finetune.method``), as a split of the parameter tree.

* ``full``: every parameter.
* ``ptuning``: only the prefix encoder (``prefix_encoder/...``, glm_jax/model/prefix.py).
* ``lora``: only the LoRA adapters (``*_lora_a``, ``*_lora_b`` beside their kernels,
  glm_jax/model/lora.py).

The train step differentiates the trainable part only and merges the frozen part back
in unchanged, so the frozen base costs no gradient, no optimizer state and no update, and
comes out of every step bit for bit as it went in. The split works on any tree shaped
like the parameters (values, shardings, abstract shapes, boxed initial values).
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

from glm_jax.model import lora

Path = tuple[str, ...]


def is_trainable(path: Path, method: str) -> bool:
    if method == "full":
        return True
    if method == "ptuning":
        return path[0] == "prefix_encoder"
    if method == "lora":
        return lora.is_adapter(path[-1])
    raise ValueError(f"unknown finetune.method {method!r}")


def is_new(path: Path) -> bool:
    """Parameters a fine-tuning run adds to its base (absent from the checkpoint it starts
    from, initialised fresh): the prefix encoder, LoRA adapters."""
    return path[0] == "prefix_encoder" or lora.is_adapter(path[-1])


def split(tree: Any, method: str) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that :func:`merge` puts back together."""
    if method == "full":
        return tree, {}
    flat = traverse_util.flatten_dict(tree)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, method)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k, method)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)
