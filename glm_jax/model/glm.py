"""The GLM decoder: embeddings -> stacked blocks (scanned or unrolled) -> final norm -> head.

One configurable module covers GLM-130B, ChatGLM-6B and the original GLM (MODEL.md §8).
Inputs are token ids, positions (``[b, L]`` or ``[b, 2, L]``), per-example Part A
lengths and optional segment ids; see ``glm_jax.kernels.attention_mask`` for the mask rule
and ``glm_jax.model.positions.prepare_inputs`` to build these from token ids.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.config import ModelConfig
from glm_jax.kernels import attention_mask
from glm_jax.model import init, linear
from glm_jax.model.block import Block, layer_norm
from glm_jax.model import prefix as prefix_kv
from glm_jax.model.dropout import DropoutRows
from glm_jax.parallel.pipeline import Pipelining, pipeline

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class _ScanBody(nn.Module):
    """Adapts Block to nn.scan's (carry, x) -> (carry, y) signature."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer_index, prefix, positions, part_a_end, segment_ids, dropout, shared_end):
        x, cache = carry
        block = _block_class(self.cfg)(self.cfg, name="block")
        layer_dropout = None if dropout is None else dropout.for_layer(layer_index)
        return block(x, layer_index, positions, part_a_end, segment_ids, cache, layer_dropout, prefix, shared_end), None


class GLM(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True  # False enables dropout (needs a "dropout" rng)
    # Run the scanned layers as a pipeline over stages (training and evaluation; prefill
    # and decoding with a KV cache use the plain layer loop). The parameters are the same.
    pipelining: Pipelining = Pipelining()

    def setup(self):
        cfg = self.cfg
        if cfg.scan_layers:
            scanned = nn.scan(
                _ScanBody,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(cfg)
        else:
            block_cls = _block_class(cfg)
            # A list attribute names its modules layers_0, layers_1, ...
            self.layers = [block_cls(cfg) for _ in range(cfg.num_layers)]
        pdtype = jnp.dtype(cfg.param_dtype)
        self.word_embeddings = self.param("word_embeddings", init.embedding(cfg), (cfg.vocab_size, cfg.hidden_size), pdtype)
        if cfg.position_encoding == "learned_2d":
            shape = (cfg.max_seq_len + 1, cfg.hidden_size)
            self.position_embeddings = self.param("position_embeddings", init.embedding(cfg, ("positions", "embed")), shape, pdtype)
            self.block_position_embeddings = self.param(
                "block_position_embeddings", init.embedding(cfg, ("positions", "embed")), shape, pdtype
            )
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", init.embedding(cfg, ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdtype)
        self.final_layernorm = layer_norm(cfg, "final_layernorm")
        if cfg.pre_seq_len:
            self.prefix_encoder = prefix_kv.PrefixEncoder(cfg)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = linear.take(self.word_embeddings, tokens, dtype)
        if cfg.position_encoding == "learned_2d":
            x = x + jnp.take(self.position_embeddings, positions[:, 0], axis=0).astype(dtype)
            x = x + jnp.take(self.block_position_embeddings, positions[:, 1], axis=0).astype(dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    def head(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[b, L, vocab]`` from final hidden states (see :func:`vocab_logits`)."""
        dtype = jnp.dtype(self.cfg.dtype)
        w = self.word_embeddings if self.cfg.tie_embeddings else self.lm_head
        if linear.is_compact(w):  # a generation-only table (glm_jax.inference.weights)
            logits = linear.einsum("bld,vd->blv" if self.cfg.tie_embeddings else "bld,dv->blv", hidden, w, jnp.float32)
        elif self.cfg.tie_embeddings:
            logits = vocab_logits(hidden, w.astype(dtype))
        else:
            logits = vocab_logits(hidden, w.astype(dtype).T)
        return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        prefix_len: Optional[jax.Array],
        segment_ids: Optional[jax.Array] = None,
        *,
        return_hidden: bool = False,
        cache: Optional[Any] = None,
        dropout_rows: tuple = (0, 1),
        shared_end: Optional[jax.Array] = None,
    ):
        """Logits ``[b, L, vocab]`` (or final hidden states with ``return_hidden``).

        dropout_rows: (offset, stride) -- these rows are rows ``offset + stride * i`` of the
          step's batch, whose dropout masks they draw (``glm_jax.model.dropout``); the
          gradient-accumulation slices pass theirs, so slicing a batch changes no mask.

        cache: a ``glm_jax.inference.kv_cache.KVCache``. The tokens' keys and values are
          stored in it and ``(logits, cache)`` is returned. Prefill (``cache.decoding``
          False) is the ordinary forward pass with the GLM mask; decoding (True) takes
          Part B tokens that continue the cached sequence, and ``prefix_len`` may be None.

        shared_end: ``[batch]``: the first ``shared_end`` tokens of each row are seen by every
          token of it besides what the GLM mask allows (``kernels/attention_mask``): one
          context scored with several continuations, each in its own segment. XLA attention.
        """
        cfg = self.cfg
        length = tokens.shape[1]
        positions = jnp.asarray(positions, jnp.int32)
        a_end = None if prefix_len is None else attention_mask.part_a_end(prefix_len, segment_ids, length)
        x = self.embed(tokens, positions)
        dropout = None
        if not self.deterministic and cfg.has_dropout:
            dropout = DropoutRows(self.make_rng("dropout"), jnp.asarray(dropout_rows[0], jnp.int32), int(dropout_rows[1]))
        prefix = prefix_kv.key_values(self.prefix_encoder(), cfg, x.shape[0], dropout) if cfg.pre_seq_len else None
        if self.pipelining.active and cache is None and not self.is_initializing():
            if prefix is not None:
                raise ValueError("a P-tuning prefix (model.pre_seq_len > 0) does not run in a pipeline (mesh.pipe=1)")
            if shared_end is not None:
                raise ValueError("rows with a shared context (shared_end) do not run in a pipeline (mesh.pipe=1)")
            x = self._pipelined_layers(x, positions, a_end, segment_ids, dropout)
        elif cfg.scan_layers:
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            shared = None if shared_end is None else jnp.asarray(shared_end, jnp.int32)
            (x, cache), _ = self.layers((x, cache), layer_ids, prefix, positions, a_end, segment_ids, dropout, shared)
        else:
            for i, block in enumerate(self.layers):
                # A Python int: a per-layer KV cache (inference/kv_cache.py) picks its buffer at trace time.
                layer_dropout = None if dropout is None else dropout.for_layer(i)
                layer_prefix = None if prefix is None else prefix[i]
                x, cache = block(x, i, positions, a_end, segment_ids, cache, layer_dropout, layer_prefix, shared_end)
        x = self.final_layernorm(x)
        out = x if return_hidden else self.head(x)
        return out if cache is None else (out, cache)

    def _pipelined_layers(self, x, positions, a_end, segment_ids, dropout):
        """The layers as a pipeline (``glm_jax.parallel.pipeline``): the batch is cut into
        microbatches of every M-th row (so each stays split over the batch's devices), each
        carrying its own positions, Part A ends, segment ids and dropout rows through the
        stages (so it draws the whole batch's dropout masks)."""
        cfg, plan = self.cfg, self.pipelining
        if not cfg.scan_layers:
            raise ValueError("pipelined layers need model.scan_layers=true (stacked layer parameters)")
        n = plan.microbatches
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be cut into {n} pipeline microbatches")

        def split(a):
            return None if a is None else a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1)

        extras = {"positions": split(positions), "part_a_end": split(a_end), "segment_ids": split(segment_ids)}
        per_microbatch = None if dropout is None else dropout.microbatches(n)
        if per_microbatch is not None:
            extras["row_offset"] = per_microbatch.row_offset
        block = Block(cfg, parent=None)

        def layer_fn(p, x, extra, i):
            layer_dropout = None
            if per_microbatch is not None:
                layer_dropout = per_microbatch.replace(row_offset=extra["row_offset"]).for_layer(i)
            out, _ = block.apply({"params": p}, x, i, extra["positions"], extra["part_a_end"], extra["segment_ids"], None,
                                 layer_dropout)
            return out

        if cfg.remat_policy != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        # The weights go in as stored (float32): each layer casts them to the compute dtype
        # where it uses them, so their gradients add up over the microbatches in float32.
        # (Casting the stack first would halve what the regroup holds, at the price of
        # summing those gradients in bfloat16; train.pipeline_gather=layer saves more.)
        weights = self.variables["params"]["layers"]["block"]
        ys = pipeline(
            layer_fn,
            weights,
            split(x),
            extras,
            stages=plan.stages,
            repeats=plan.repeats,
            x_names=("batch", "length", "act_embed"),
            param_names=layer_param_names(cfg),
            gather=plan.gather,
        )
        return ys.swapaxes(0, 1).reshape(x.shape)


INIT_LENGTH = 8  # parameters do not depend on the sequence length; any short one will do


def example_inputs(cfg: ModelConfig, batch: int = 1, length: int = INIT_LENGTH) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero ``(tokens, positions, prefix_len)`` of the shapes the model takes."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    positions = jnp.zeros((batch, 2, length) if cfg.two_d_positions else (batch, length), jnp.int32)
    return tokens, positions, jnp.zeros((batch,), jnp.int32)


@functools.lru_cache(maxsize=None)
def layer_param_names(cfg: ModelConfig) -> Any:
    """Logical axis names (PartitionSpecs) of one scanned layer's ``[layers, ...]`` parameters."""
    boxed = jax.eval_shape(lambda r: GLM(cfg, parent=None).init(r, *example_inputs(cfg)), jax.random.key(0))
    return nn.get_partition_spec(boxed["params"]["layers"]["block"])


@jax.custom_vjp
def vocab_logits(hidden: jax.Array, table: jax.Array) -> jax.Array:
    """``hidden [b, L, d] @ table[vocab, d].T`` accumulated and returned in float32.

    The loss and sampling want float32 logits, so none are rounded to the compute dtype
    on the way (and XLA's CPU backend runs this vocabulary-wide matmul ~1.4x faster with a
    float32 result). The backward pass rounds the float32 cotangent to the compute dtype
    first, as mixed-precision training does anyway, so both backward matmuls stay in
    bf16 on accelerators instead of being promoted to float32.
    """
    return jnp.einsum("bld,vd->blv", hidden, table, preferred_element_type=jnp.float32)


def _vocab_logits_fwd(hidden, table):
    return vocab_logits(hidden, table), (hidden, table)


def _vocab_logits_bwd(res, ct):
    hidden, table = res
    ct = ct.astype(hidden.dtype)
    d_hidden = jnp.einsum("blv,vd->bld", ct, table, preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_table = jnp.einsum("blv,bld->vd", ct, hidden, preferred_element_type=jnp.float32).astype(table.dtype)
    return d_hidden, d_table


vocab_logits.defvjp(_vocab_logits_fwd, _vocab_logits_bwd)


def output_embedding(params, cfg: ModelConfig) -> jax.Array:
    """The head's weight as ``[vocab, embed]`` in the compute dtype, from a parameter tree
    (for losses that apply the head themselves, e.g. vocabulary-chunked cross-entropy)."""
    dtype = jnp.dtype(cfg.dtype)
    if cfg.tie_embeddings:
        return params["word_embeddings"].astype(dtype)
    return params["lm_head"].astype(dtype).T
