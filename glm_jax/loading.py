"""Load a converted (or saved) glm_jax checkpoint and run it: ``load(dir).logits(ids)``.

    model = load("chatglm-6b-jax")          # from `python -m glm_jax.convert from-hf`
    logits = model.logits(input_ids)         # [batch, seq] ints -> [batch, seq, vocab] float32

The caller passes token ids only. Positions and the Part A length are built from them
by the authors' rules (``glm_jax.model.masks.prepare_inputs``): Part A is everything
before ``<sop>``; with ``[gMASK]`` (ChatGLM: 2D positions) the position row holds the
mask's index from ``<sop>`` on and the block row counts 1, 2, ... there; leading
``pad_token_id`` tokens are left padding. So ``[t0 .. tn, [gMASK], <sop>, ...]`` gives
the logits the authors' model gives for the same ids.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from glm_jax.config import ConfigError, ModelConfig, load_config
from glm_jax.convert import layout, output


@dataclasses.dataclass
class LoadedModel:
    """A model config and its parameters, ready to score token ids."""

    config: ModelConfig
    params: Any
    _apply: Any = dataclasses.field(default=None, repr=False)

    def logits(self, input_ids) -> np.ndarray:
        """``[batch, seq]`` integer ids -> ``[batch, seq, vocab]`` float32 logits."""
        import jax

        from glm_jax.model import GLM, prepare_inputs

        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {ids.shape} (wrap a single sequence in a list)")
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a [batch, seq] integer array; got {ids.dtype} of shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); got [{ids.min()}, {ids.max()}]")
        inputs = prepare_inputs(ids, self.config)
        if self._apply is None:
            self._apply = jax.jit(GLM(self.config).apply)
        out = self._apply({"params": self.params}, ids.astype(np.int32), inputs["positions"], inputs["prefix_len"], inputs["segment_ids"])
        return np.asarray(out, dtype=np.float32)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def load(checkpoint_dir: str, *, dtype: Optional[str] = None) -> LoadedModel:
    """Restore ``checkpoint_dir`` (``config.yaml`` + ``params/``).

    dtype: compute dtype override (converted checkpoints compute in float32; parameters
      keep their stored dtypes and are cast inside the model).
    """
    import orbax.checkpoint as ocp

    cfg_path = os.path.join(checkpoint_dir, output.CONFIG)
    params_path = os.path.abspath(os.path.join(checkpoint_dir, output.PARAMS))
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{checkpoint_dir}: no {output.CONFIG}; expected a directory written by python -m glm_jax.convert")
    if not os.path.isdir(params_path):
        raise FileNotFoundError(f"{checkpoint_dir}: no {output.PARAMS}/ directory")
    cfg = load_config(cfg_path).model
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        cfg.validate()
    params = ocp.StandardCheckpointer().restore(params_path)
    got = {k: tuple(v.shape) for k, v in _flatten(params).items()}
    want = layout.leaf_shapes(cfg)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        detail = "; ".join(
            part for part in (
                f"missing {'/'.join(missing[0])}" if missing else "",
                f"unexpected {'/'.join(extra[0])}" if extra else "",
                f"{'/'.join(wrong[0])} is {list(got[wrong[0]])}, config implies {list(want[wrong[0]])}" if wrong else "",
            ) if part
        )
        raise ConfigError(f"{checkpoint_dir}: parameters do not match {output.CONFIG} ({detail})")
    return LoadedModel(config=cfg, params=params)
