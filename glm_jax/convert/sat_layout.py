"""Tensor-parallel SAT checkpoints: each tensor's key and how it is split over ranks.

Two layouts share the file format (``<iter>/mp_rank_XX_model_states.pt`` holding
``{"module": state_dict, ...}``, MODEL.md §4.1):

``glm-130b``  GLM-130B's SwissArmyTransformer checkpoints: the keys of
              ``glm_jax.checkpoint.authors_layout`` (``transformer.*``), QKV rows interleaved per
              head, GeGLU ``dense_h_to_4h``, tied head.
``glm``       The original GLM (THUDM/GLM): ``word_embeddings.weight`` at the top level,
              learned position and block-position tables, QKV rows blocked
              ``[Q; K; V]``, 4h MLP.

Each tensor is split one of three ways (GLM-130B ``tools/convert_tp.py``, GLM
``change_mp.py``):

- ``rows`` with a stride s: dimension 0 is s equal parts and rank r holds the r-th run
  of every part, concatenated. s = 1 is a plain split (vocabulary rows, interleaved QKV,
  the 4h MLP's input); s = 2 is the GLU rule (rank r holds ``cat(X1[r], X2[r])``); s = 3
  is the original GLM's blocked QKV (rank r holds ``[Q_r; K_r; V_r]``). A split also
  keeps runs of ``unit`` rows whole (a head's rows).
- ``cols``: dimension 1 (``attention.dense``, ``dense_4h_to_h``: row-parallel linears).
- ``replicated``: every rank holds the whole tensor (LayerNorms, row-parallel biases,
  position tables).

Pre-quantized linears store an int8 ``weight`` (INT4: two input columns per byte) that
splits like the dense weight, and an fp16 ``weight_scale`` with one value per output
row *of the rank's shard*. For the column-parallel linears that is just the rows split
like the weight's; for the row-parallel ones each rank has its own scale of every
output row (computed over its columns), so the merged scale is ``[ranks, out]``
(kind ``stacked``), and it can only be split again into a multiple of its ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from glm_jax.config import ModelConfig
from glm_jax.checkpoint import authors_layout, quantized

LAYOUTS = ("glm-130b", "glm")
DESCRIPTION = {"glm-130b": "GLM-130B's SAT layout", "glm": "the original GLM's layout"}
# Tensors a converter passes over (the rotary inverse frequencies, recomputed by every loader).
IGNORED_SUFFIXES = ("inv_freq",)


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Split:
    """How one tensor is split over ``tp`` ranks."""

    kind: str  # rows | cols | replicated | stacked
    stride: int = 1  # rows: equal parts of dimension 0 (1 plain, 2 GLU halves, 3 blocked QKV)
    unit: int = 1  # rows: runs of this many rows stay on one rank (a head's rows)

    def shard_shape(self, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
        if self.kind == "rows":
            return (full[0] // tp,) + tuple(full[1:])
        if self.kind == "cols":
            return (full[0], full[1] // tp) + tuple(full[2:])
        if self.kind == "stacked":
            return tuple(full[1:])
        return tuple(full)

    def merged_shape(self, shard: tuple[int, ...], tp: int) -> tuple[int, ...]:
        if self.kind == "rows":
            return (shard[0] * tp,) + tuple(shard[1:])
        if self.kind == "cols":
            return (shard[0], shard[1] * tp) + tuple(shard[2:])
        if self.kind == "stacked":
            return (tp,) + tuple(shard)
        return tuple(shard)

    def why_not(self, full: tuple[int, ...], tp: int) -> Optional[str]:
        """None if ``full`` splits over ``tp`` ranks, else the reason."""
        if self.kind == "rows":
            per = full[0] // self.stride
            if per % (tp * self.unit):
                parts = {1: "", 2: " per GLU half", 3: " per Q/K/V block"}[self.stride]
                whole = f" in whole runs of {self.unit} (one head)" if self.unit > 1 else ""
                return f"its {per} rows{parts} do not split into {tp} equal parts{whole}"
        elif self.kind == "cols":
            if full[1] % tp:
                return f"its {full[1]} columns do not split into {tp} equal parts"
        elif self.kind == "stacked":
            if tp % full[0]:
                return f"it holds one scale per row for each of {full[0]} source ranks, which {tp} ranks cannot share out"
        return None

    def row_pieces(self, rows: int, tp: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Merged rows ``[start, stop)`` of a ``rows`` split as (rank, local start, local stop), in order."""
        part = rows // self.stride
        per = part // tp
        out = []
        i = start
        while i < stop:
            end = min(stop, (i // per + 1) * per)
            p, j = divmod(i, part)
            rank, off = divmod(j, per)
            local = p * per + off
            out.append((rank, local, local + end - i))
            i = end
        return out


ROWS = Split("rows")
COLS = Split("cols")
REPLICATED = Split("replicated")
STACKED = Split("stacked")


@dataclasses.dataclass(frozen=True)
class SatEntry:
    """One tensor of a SAT checkpoint: its key in the rank files, where it lives in
    glm_jax's parameters (``entry``) and how it is split."""

    key: str
    entry: authors_layout.Entry
    split: Split

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.transform.authors_shape

    @property
    def quantizable(self) -> bool:
        return quantized.is_quantized_linear(self.entry.key)

    @property
    def scale_key(self) -> str:
        return quantized.scale_key(self.key)

    @property
    def scale_split(self) -> Split:
        """The split of a quantized linear's ``weight_scale``."""
        return STACKED if self.split.kind == "cols" else self.split

    def quantized_shape(self, bits: int) -> tuple[int, ...]:
        return quantized.packed_shape(self.shape, bits)

    def merged_scale_shape(self, tp: int) -> tuple[int, ...]:
        """The kept scale's merged shape for a ``tp``-rank source."""
        return (tp, self.shape[0]) if self.split.kind == "cols" else (self.shape[0],)


def _split(name: str, fmt: str, cfg: ModelConfig) -> Split:
    """The split of the tensor ``name`` (its key within a layer, or a model-level key)."""
    if name.endswith("word_embeddings.weight"):
        return ROWS
    if "position_embeddings" in name or "layernorm" in name:
        return REPLICATED
    if name.startswith("attention.query_key_value."):
        if fmt == "glm":
            return Split("rows", stride=3, unit=cfg.head_dim)
        return Split("rows", unit=3 * cfg.head_dim)
    if name.startswith("mlp.dense_h_to_4h."):
        return Split("rows", stride=2) if cfg.mlp_type == "geglu" else ROWS
    if name in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
        return COLS
    if name in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
        return REPLICATED
    raise ValueError(f"no tensor-parallel rule for {name}")


def _key(key: str, fmt: str) -> str:
    """The SAT key of an authors' key of ``glm_jax.checkpoint.authors_layout``."""
    if fmt == "glm" and key == "transformer.word_embeddings.weight":
        return "word_embeddings.weight"
    return key


def sat_entries(cfg: ModelConfig, fmt: str) -> list[SatEntry]:
    """Every tensor of ``cfg`` in layout ``fmt``, in the authors' order."""
    if fmt not in LAYOUTS:
        raise ValueError(f"SAT layout {fmt!r}: expected one of {LAYOUTS}")
    out = []
    for e in authors_layout.entries(cfg, qkv="blocked" if fmt == "glm" else "interleaved"):
        name = e.key.split(".", 3)[3] if e.layer is not None else e.key
        out.append(SatEntry(_key(e.key, fmt), e, _split(name, fmt, cfg)))
    return out


def detect(keys) -> Optional[str]:
    """The layout of a state dict with these keys (None if neither)."""
    keys = set(keys)
    if "transformer.word_embeddings.weight" in keys:
        return "glm-130b"
    if "word_embeddings.weight" in keys:
        return "glm"
    return None


def layout_of(cfg: ModelConfig) -> str:
    """The SAT layout a model is written in: the original GLM's for learned positions."""
    return "glm" if cfg.position_encoding == "learned_2d" else "glm-130b"


# What each layout's model code hard-wires (MODEL.md §1, §3.1).
_FIXED = {
    "glm-130b": {"norm_order": "post", "mlp_type": "geglu", "gelu_approximate": False, "use_bias": True,
                 "tie_embeddings": True, "position_encoding": "rotary_1d", "attention_layer_scaling": True},
    "glm": {"norm_order": "pre", "mlp_type": "gelu", "gelu_approximate": True, "use_bias": True,
            "tie_embeddings": True, "position_encoding": "learned_2d"},
}


def check_representable(cfg: ModelConfig, fmt: str) -> Optional[str]:
    """None if ``fmt``'s model code computes ``cfg``'s model, else what differs."""
    for key, v in _FIXED[fmt].items():
        if getattr(cfg, key) != v:
            return f"{DESCRIPTION[fmt]} needs model.{key}={v}; this model has {getattr(cfg, key)!r}"
    if fmt == "glm-130b" and abs(cfg.alpha - (2.0 * cfg.num_layers) ** 0.5) > 1e-9 * cfg.alpha:
        return f"{DESCRIPTION[fmt]} uses the DeepNorm alpha sqrt(2 * num_layers); this model has model.residual_alpha={cfg.residual_alpha}"
    return None


def inferred_sizes(shapes: dict[str, tuple[int, ...]], tp: int, fmt: str) -> dict[str, int]:
    """The model sizes the merged shapes of a checkpoint say (for error messages): what
    shapes determine unambiguously. ``shapes`` maps keys to one rank's shapes."""
    out = {}
    emb = shapes.get(_key("transformer.word_embeddings.weight", fmt))
    if emb is not None and len(emb) == 2:
        out["vocab_size"], out["hidden_size"] = emb[0] * tp, emb[1]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("transformer.layers.") and k.split(".")[2].isdigit()}
    if layers:
        out["num_layers"] = max(layers) + 1
    h4 = shapes.get("transformer.layers.0.mlp.dense_h_to_4h.bias")
    if h4 is not None and len(h4) == 1:
        out["mlp_dim"] = h4[0] * tp // (2 if fmt == "glm-130b" else 1)
    pos = shapes.get("transformer.position_embeddings.weight")
    if pos is not None and len(pos) == 2:
        out["max_seq_len"] = pos[0] - 1
    return out
