"""The one mapping between glm_jax's parameters and the authors' state-dict layout.

The authors (GLM-130B's SAT code, ChatGLM-6B's Hugging Face code) store torch ``Linear``
weights as ``[out, in]`` with the fused QKV rows interleaved per head (row
``n*3*hd + c*hd + d`` is head n, component c in q|k|v, dim d; MODEL.md §1.3, §2.4); the
original GLM blocks them instead (row ``c*h + n*hd + d``, MODEL.md §3.1).
glm_jax stores ``[in, out]`` kernels with the structure made explicit
(``qkv_kernel [embed, 3, heads, head_dim]``, ``out_kernel [heads, head_dim, embed]``,
GeGLU ``wi_kernel [embed, 2, mlp]``) and, with ``scan_layers``, every per-layer leaf
stacked on a leading ``layers`` axis.

Every tensor's mapping is one :class:`Transform`: view the authors' tensor as ``split``,
then permute the axes. Because a transform is data rather than code, the same object
drives the whole-array conversions below, the streaming converters (which cut tensors
into row blocks, see ``glm_jax.convert.blocks``) and both directions, so the directions
cannot drift apart. Numpy only: the converters must not pay for importing jax.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from glm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """ours = authors.reshape(split).transpose(perm); authors = ours.transpose(inverse).reshape(shape).

    lead: how many leading axes of ``split`` make up the authors' dimension 0 (rows).
    block_axis: the axis of ``split`` (< lead) that streaming cuts into blocks; the axes
      before it are taken one index at a time, the ones after it whole, so a block is
      a contiguous run of the authors' rows and a box in our layout.
    """

    authors_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    lead: int = 1
    block_axis: int = 0

    def __post_init__(self):
        assert int(np.prod(self.split)) == int(np.prod(self.authors_shape)), (self.split, self.authors_shape)
        assert sorted(self.perm) == list(range(len(self.split))), self.perm
        assert int(np.prod(self.split[: self.lead])) == self.authors_shape[0], (self.split, self.lead)
        assert 0 <= self.block_axis < self.lead

    @property
    def ours_shape(self) -> tuple[int, ...]:
        return tuple(self.split[p] for p in self.perm)

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x).reshape(self.split).transpose(self.perm))

    def to_authors(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x).transpose(self.inverse_perm).reshape(self.authors_shape))


def _identity(*shape: int) -> Transform:
    return Transform(tuple(shape), tuple(shape), tuple(range(len(shape))))


def _transpose(rows: int, cols: int) -> Transform:
    """torch ``Linear`` ``[out, in]`` <-> our ``[in, out]``."""
    return Transform((rows, cols), (rows, cols), (1, 0))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One authors' tensor and the glm_jax leaf it lives in.

    path: the leaf's path in the glm_jax parameter tree; layer: the layer index for a
    per-layer tensor (with scan_layers the leaf holds every layer on its axis 0),
    None for a model-level tensor.
    """

    key: str
    path: tuple[str, ...]
    layer: Optional[int]
    transform: Transform

    @property
    def is_layernorm(self) -> bool:
        return "layernorm" in self.key


QKV_LAYOUTS = ("interleaved", "blocked")


def _qkv_transforms(cfg: ModelConfig, qkv: str) -> tuple[Transform, Transform]:
    """(weight, bias) of the fused QKV.

    interleaved (GLM-130B, ChatGLM-6B): rows (head, q|k|v, dim); blocks are runs of heads.
    blocked (the original GLM, MODEL.md §3.1): rows (q|k|v, head, dim) -- all Q rows, then
    all K, then all V; blocks are runs of heads within one of the three.
    """
    h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if qkv == "interleaved":
        # rows (head, q|k|v, dim) x in -> [in, q|k|v, head, dim]
        return (Transform((3 * h, h), (nh, 3, hd, h), (3, 1, 0, 2), lead=3),
                Transform((3 * h,), (nh, 3, hd), (1, 0, 2), lead=3))
    if qkv == "blocked":
        # rows (q|k|v, head, dim) x in -> [in, q|k|v, head, dim]
        return (Transform((3 * h, h), (3, nh, hd, h), (3, 0, 1, 2), lead=3, block_axis=1),
                Transform((3 * h,), (3, nh, hd), (0, 1, 2), lead=3, block_axis=1))
    raise ValueError(f"qkv layout {qkv!r}: expected one of {QKV_LAYOUTS}")


def _layer_transforms(cfg: ModelConfig, qkv: str = "interleaved") -> list[tuple[str, tuple[str, ...], Transform]]:
    """(authors' name within ``transformer.layers.N.``, our path within a block, transform)."""
    h, nh, hd, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    qkv_weight, qkv_bias = _qkv_transforms(cfg, qkv)
    out: list[tuple[str, tuple[str, ...], Transform]] = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), _identity(h)),
        ("input_layernorm.bias", ("input_layernorm", "bias"), _identity(h)),
        ("attention.query_key_value.weight", ("attention", "qkv_kernel"), qkv_weight),
    ]
    if cfg.use_bias:
        out.append(("attention.query_key_value.bias", ("attention", "qkv_bias"), qkv_bias))
    # [out, head*dim] -> [head, dim, out]
    out.append(("attention.dense.weight", ("attention", "out_kernel"), Transform((h, nh * hd), (h, nh, hd), (1, 2, 0))))
    if cfg.use_bias:
        out.append(("attention.dense.bias", ("attention", "out_bias"), _identity(h)))
    out += [
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), _identity(h)),
        ("post_attention_layernorm.bias", ("post_attention_layernorm", "bias"), _identity(h)),
    ]
    if cfg.mlp_type == "geglu":
        # rows (linear half | gelu half, unit) x in -> [in, half, unit]; blocks cut within a half
        out.append(("mlp.dense_h_to_4h.weight", ("mlp", "wi_kernel"), Transform((2 * f, h), (2, f, h), (2, 0, 1), lead=2, block_axis=1)))
        if cfg.use_bias:
            out.append(("mlp.dense_h_to_4h.bias", ("mlp", "wi_bias"), Transform((2 * f,), (2, f), (0, 1), lead=2, block_axis=1)))
    else:
        out.append(("mlp.dense_h_to_4h.weight", ("mlp", "wi_kernel"), _transpose(f, h)))
        if cfg.use_bias:
            out.append(("mlp.dense_h_to_4h.bias", ("mlp", "wi_bias"), _identity(f)))
    out.append(("mlp.dense_4h_to_h.weight", ("mlp", "wo_kernel"), _transpose(h, f)))
    if cfg.use_bias:
        out.append(("mlp.dense_4h_to_h.bias", ("mlp", "wo_bias"), _identity(h)))
    return out + _lora_transforms(cfg, qkv)


LORA_MODULES = {"qkv": "attention.query_key_value", "dense": "attention.dense", "mlp_in": "mlp.dense_h_to_4h",
                "mlp_out": "mlp.dense_4h_to_h"}


def _lora_transforms(cfg: ModelConfig, qkv: str) -> list[tuple[str, tuple[str, ...], Transform]]:
    """LoRA adapters (``model.lora_rank`` > 0; glm_jax/model/lora.py) under PEFT's names
    within a layer: ``<module>.lora_A.weight [r, in]`` and ``<module>.lora_B.weight [out, r]``,
    the output rows in the base weight's order (query_key_value interleaved per head)."""
    r, h, nh, hd, f = cfg.lora_rank, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    if not r:
        return []
    qkv_weight, _ = _qkv_transforms(cfg, qkv)
    b_qkv = Transform((3 * h, r), qkv_weight.split[:3] + (r,), qkv_weight.perm, lead=3, block_axis=qkv_weight.block_axis)
    if cfg.mlp_type == "geglu":
        b_in = Transform((2 * f, r), (2, f, r), (2, 0, 1), lead=2, block_axis=1)
    else:
        b_in = _transpose(f, r)
    pairs = {
        "qkv": (("attention", "qkv"), _transpose(r, h), b_qkv),
        "dense": (("attention", "out"), Transform((r, nh * hd), (r, nh, hd), (1, 2, 0)), _transpose(h, r)),
        "mlp_in": (("mlp", "wi"), _transpose(r, h), b_in),
        "mlp_out": (("mlp", "wo"), _transpose(r, f), _transpose(h, r)),
    }
    out = []
    for target in (t for t in cfg.lora_targets.split(",") if t):
        (module, stem), a, b = pairs[target]
        out.append((f"{LORA_MODULES[target]}.lora_A.weight", (module, f"{stem}_lora_a"), a))
        out.append((f"{LORA_MODULES[target]}.lora_B.weight", (module, f"{stem}_lora_b"), b))
    return out


def layer_prefix(cfg: ModelConfig, i: int) -> tuple[str, ...]:
    """Where layer i's block lives: ``layers/block`` (stacked) or ``layers_i`` (unrolled)."""
    return ("layers", "block") if cfg.scan_layers else (f"layers_{i}",)


def entries(cfg: ModelConfig, qkv: str = "interleaved") -> list[Entry]:
    """Every authors' tensor of ``cfg``, in the authors' state-dict order.

    qkv: how the authors' fused QKV rows are ordered (``interleaved`` per head, or
    ``blocked`` as the original GLM stores them); our layout is the same either way.
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [Entry("transformer.word_embeddings.weight", ("word_embeddings",), None, _identity(v, h))]
    if cfg.position_encoding == "learned_2d":
        n = cfg.max_seq_len + 1
        out.append(Entry("transformer.position_embeddings.weight", ("position_embeddings",), None, _identity(n, h)))
        out.append(Entry("transformer.block_position_embeddings.weight", ("block_position_embeddings",), None, _identity(n, h)))
    per_layer = _layer_transforms(cfg, qkv)
    for i in range(cfg.num_layers):
        for name, path, t in per_layer:
            out.append(Entry(f"transformer.layers.{i}.{name}", layer_prefix(cfg, i) + path, i, t))
    out.append(Entry("transformer.final_layernorm.weight", ("final_layernorm", "scale"), None, _identity(h)))
    out.append(Entry("transformer.final_layernorm.bias", ("final_layernorm", "bias"), None, _identity(h)))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), None, _transpose(v, h)))
    return out + prefix_entries(cfg)


PREFIX_KEY = "transformer.prefix_encoder."


def prefix_entries(cfg: ModelConfig) -> list[Entry]:
    """P-tuning v2's prefix encoder (``model.pre_seq_len`` > 0; glm_jax/model/prefix.py) under
    the authors' names: ``embedding.weight``, and with ``prefix_projection`` the two linear
    layers ``trans.0`` and ``trans.2`` (``[out, in]`` weights)."""
    if not cfg.pre_seq_len:
        return []
    h, p, kv = cfg.hidden_size, cfg.pre_seq_len, cfg.num_layers * 2 * cfg.hidden_size
    enc = ("prefix_encoder",)
    if not cfg.prefix_projection:
        return [Entry(PREFIX_KEY + "embedding.weight", enc + ("embedding",), None, _identity(p, kv))]
    return [
        Entry(PREFIX_KEY + "embedding.weight", enc + ("embedding",), None, _identity(p, h)),
        Entry(PREFIX_KEY + "trans.0.weight", enc + ("trans_0_kernel",), None, _transpose(h, h)),
        Entry(PREFIX_KEY + "trans.0.bias", enc + ("trans_0_bias",), None, _identity(h)),
        Entry(PREFIX_KEY + "trans.2.weight", enc + ("trans_2_kernel",), None, _transpose(kv, h)),
        Entry(PREFIX_KEY + "trans.2.bias", enc + ("trans_2_bias",), None, _identity(kv)),
    ]


def leaf_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every glm_jax parameter leaf (with the layers axis when scanned)."""
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for e in entries(cfg):
        shape = e.transform.ours_shape
        if e.layer is not None and cfg.scan_layers:
            shape = (cfg.num_layers,) + shape
        shapes.setdefault(e.path, shape)
    return shapes


def leaf_index(e: Entry, cfg: ModelConfig) -> tuple:
    """The index of ``e``'s tensor inside its leaf (its layer's slice when stacked)."""
    return (e.layer,) if e.layer is not None and cfg.scan_layers else ()


# ---------------------------------------------------------------------------
# Whole-array conversions (small models, tests, in-memory use).


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def to_authors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """glm_jax parameters -> the authors' state dict (numpy, dtypes kept), in their order."""
    out = {}
    for e in entries(cfg):
        leaf = np.asarray(_get(params, e.path))
        out[e.key] = e.transform.to_authors(leaf[leaf_index(e, cfg)])
    return out


def from_authors(state_dict: dict, cfg: ModelConfig) -> dict:
    """The authors' state dict -> nested glm_jax parameters (numpy, dtypes kept).

    Extra keys (rotary ``inv_freq`` buffers and the like) are ignored; a missing key
    raises KeyError naming it.
    """
    leaves: dict[tuple[str, ...], np.ndarray] = {}
    shapes = leaf_shapes(cfg)
    for e in entries(cfg):
        x = e.transform.to_ours(np.asarray(state_dict[e.key]))
        if e.path not in leaves:
            leaves[e.path] = np.empty(shapes[e.path], x.dtype) if leaf_index(e, cfg) else x
        if leaf_index(e, cfg):
            leaves[e.path][leaf_index(e, cfg)] = x
    tree: dict = {}
    for path, x in leaves.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = x
    return tree
