"""Typed configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

Every value is checked before any work starts; a bad key or value raises
:class:`ConfigError` with a one-line message that names the key and what is valid.

    cfg = load_config("glm-tiny", ["train.steps=20", "mesh.model=4"])  # or a path to any YAML
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Optional, Sequence

import yaml

from glm_jax.errors import UserError


class ConfigError(UserError):
    """A configuration problem, phrased for the user (one line)."""


DType = Literal["float32", "bfloat16", "float16"]


LORA_TARGETS = ("qkv", "dense", "mlp_in", "mlp_out")  # model.lora_targets (glm_jax/model/lora.py)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One configurable GLM decoder; each variant is a choice of these fields (MODEL.md §8)."""

    name: str = "glm-tiny"
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256  # FFN inner size f (GeGLU's h->4h projection outputs 2f)
    max_seq_len: int = 512

    # Block structure.
    norm_order: Literal["post", "pre"] = "post"  # post = DeepNorm (GLM-130B, ChatGLM); pre = original GLM
    residual_alpha: Optional[float] = None  # DeepNorm alpha; None -> (2N)^0.5 for post-LN, 1 for pre-LN
    layernorm_epsilon: float = 1e-5
    mlp_type: Literal["geglu", "gelu"] = "geglu"
    gelu_approximate: bool = False  # False: exact erf GELU (GLM-130B); True: tanh form (ChatGLM, GLM)
    use_bias: bool = True
    tie_embeddings: bool = True

    # Positions.
    position_encoding: Literal["rotary_1d", "rotary_2d", "learned_2d"] = "rotary_1d"
    rotary_base: float = 10000.0
    rotary_inv_freq_fp16: bool = True  # the authors round inv_freq to fp16 (MODEL.md §1.7)
    rotary_angle_dtype: Literal["float32", "float16"] = "float32"

    # Attention. auto: the fused Pallas kernel on TPU/GPU, the XLA reference on CPU.
    attention_impl: Literal["auto", "xla", "pallas"] = "auto"
    # Pallas kernel block lengths (queries / keys, forward / backward); 0 = the backend's
    # default (TPU 512, GPU 128/64). Powers of two; on TPU multiples of 128.
    attention_block_q: int = 0
    attention_block_kv: int = 0
    attention_block_q_bwd: int = 0
    attention_block_kv_bwd: int = 0
    attention_layer_scaling: bool = True  # q/(sqrt(d)*c), fp32 scores*c, c = layer index + 1
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    # P-tuning v2 (ChatGLM-6B's pre_seq_len / prefix_projection, kept on the model config as
    # the authors do): a prefix encoder gives every layer pre_seq_len extra keys and values,
    # without rotary, that every token sees. 0 = no prefix. See glm_jax/model/prefix.py.
    pre_seq_len: int = 0
    prefix_projection: bool = False  # an MLP (hidden -> tanh -> layers*2*hidden) over a hidden-wide embedding
    prefix_dropout: float = 0.1  # on the prefix keys and values while training (the authors' 0.1)

    # LoRA (PEFT's, as the community applies it to ChatGLM-6B): a rank-r update
    # B @ A * lora_alpha / lora_rank beside each target linear, B starting at zero. 0 = none.
    # Targets, comma-separated: qkv, dense, mlp_in, mlp_out. See glm_jax/model/lora.py.
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = "qkv"

    # Precision and memory.
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"

    # Initialisation and training tricks.
    init: Literal["deepnorm", "normal"] = "deepnorm"
    init_std: float = 0.0052  # word embeddings (and every weight for init=normal)
    embedding_grad_shrink: float = 1.0  # alpha_s; 1.0 = off, GLM-130B uses 0.1

    # Special tokens (ids into this model's vocabulary).
    mask_token_id: int = 1000
    gmask_token_id: int = 1001
    smask_token_id: int = 1002
    eod_token_id: int = 1003
    sop_token_id: int = 1004
    eop_token_id: int = 1005
    eos_token_id: int = 1006
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def two_d_positions(self) -> bool:
        """Positions are ``[b, 2, L]`` (position ids, block position ids) rather than ``[b, L]``:
        ChatGLM-6B's 2D rotary and the original GLM's two learned position tables."""
        return self.position_encoding in ("rotary_2d", "learned_2d")

    @property
    def rotary_dim(self) -> int:
        """Dimensions one rotary table covers: the whole head (1D), half of it (2D: one half
        per position row), 0 for learned positions (MODEL.md §1.3, §2.2)."""
        return {"rotary_1d": self.head_dim, "rotary_2d": self.head_dim // 2}.get(self.position_encoding, 0)

    @property
    def has_dropout(self) -> bool:
        """Training draws dropout masks somewhere (attention, hidden states, the prefix)."""
        return (self.attention_dropout > 0 or self.hidden_dropout > 0 or (self.pre_seq_len > 0 and self.prefix_dropout > 0)
                or (self.lora_rank > 0 and self.lora_dropout > 0))

    @property
    def alpha(self) -> float:
        if self.residual_alpha is not None:
            return self.residual_alpha
        return math.sqrt(2.0 * self.num_layers) if self.norm_order == "post" else 1.0

    @property
    def deepnorm_beta(self) -> float:
        return (2.0 * self.num_layers) ** -0.5

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            _require(getattr(self, key) > 0, f"model.{key} must be > 0, got {getattr(self, key)}")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})",
        )
        if self.position_encoding == "rotary_2d":
            _require(
                self.head_dim % 4 == 0,
                f"model.position_encoding=rotary_2d needs head_dim (hidden_size/num_heads = {self.head_dim}) divisible by 4",
            )
        if self.position_encoding == "rotary_1d":
            _require(self.head_dim % 2 == 0, f"model.position_encoding=rotary_1d needs an even head_dim, got {self.head_dim}")
        _require(self.layernorm_epsilon > 0, f"model.layernorm_epsilon must be > 0, got {self.layernorm_epsilon}")
        _require(self.rotary_base > 0, f"model.rotary_base must be > 0, got {self.rotary_base}")
        _require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        _require(
            0.0 < self.embedding_grad_shrink <= 1.0,
            f"model.embedding_grad_shrink must be in (0, 1], got {self.embedding_grad_shrink}",
        )
        if self.residual_alpha is not None:
            _require(self.residual_alpha > 0, f"model.residual_alpha must be > 0, got {self.residual_alpha}")
        for key in ("attention_block_q", "attention_block_kv", "attention_block_q_bwd", "attention_block_kv_bwd"):
            v = getattr(self, key)
            _require(
                v == 0 or (v >= 8 and v & (v - 1) == 0),
                f"model.{key}={v} must be 0 (the backend's default) or a power of two >= 8",
            )
        _require(self.pre_seq_len >= 0, f"model.pre_seq_len must be >= 0 (0: no prefix), got {self.pre_seq_len}")
        _require(not (self.pre_seq_len and self.attention_impl == "pallas"),
                 "model.attention_impl=pallas has no prefix keys; P-tuning (model.pre_seq_len > 0) runs attention_impl=xla "
                 "or auto")
        _require(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if self.lora_rank:
            names = [t for t in self.lora_targets.split(",") if t]
            bad = [t for t in names if t not in LORA_TARGETS]
            _require(bool(names) and not bad, f"model.lora_targets={self.lora_targets!r} is not valid; valid values "
                                              f"(comma-separated): {', '.join(LORA_TARGETS)}")
            _require(len(set(names)) == len(names), f"model.lora_targets={self.lora_targets!r} names a target twice")
            _require(self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        for key in ("attention_dropout", "hidden_dropout", "prefix_dropout", "lora_dropout"):
            _require(0.0 <= getattr(self, key) < 1.0, f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_token_id"):
                v = getattr(self, f.name)
                _require(
                    0 <= v < self.vocab_size,
                    f"model.{f.name}={v} is outside the vocabulary [0, {self.vocab_size})",
                )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis fills the remaining devices."""

    data: int = -1
    model: int = 1
    pipe: int = 1
    # What the data axis shards besides the batch: "replicated" (plain data parallelism),
    # "zero1" (AdamW state split over data: ZeRO stage 1), "fsdp" (parameters, gradients
    # and AdamW state split over data along their embed dimension).
    param_sharding: Literal["replicated", "zero1", "fsdp"] = "replicated"
    # Multislice TPU: how many slices the pipe axis spans (DCN carries only the small
    # activations between neighbouring stages); data spans the remaining slice factor.
    # 1 = only data spans slices. model always stays inside a slice.
    dcn_pipe: int = 1

    def axis_sizes(self, device_count: int) -> dict[str, int]:
        sizes = {"data": self.data, "pipe": self.pipe, "model": self.model}
        fill = [k for k, v in sizes.items() if v == -1]
        known = math.prod(v for v in sizes.values() if v != -1)
        if fill:
            if device_count % known:
                raise ConfigError(
                    f"mesh: {device_count} devices cannot be split with "
                    + " ".join(f"mesh.{k}={v}" for k, v in sizes.items())
                )
            sizes[fill[0]] = device_count // known
        product = math.prod(sizes.values())
        if product != device_count:
            raise ConfigError(
                "mesh: "
                + " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
                + f" = {product} devices, but {device_count} are available"
            )
        return sizes

    def validate(self) -> None:
        fills = 0
        for key in ("data", "model", "pipe"):
            v = getattr(self, key)
            _require(v == -1 or v > 0, f"mesh.{key} must be a positive size or -1 (fill), got {v}")
            fills += v == -1
        _require(fills <= 1, "mesh: at most one of mesh.data, mesh.model, mesh.pipe may be -1")
        _require(self.dcn_pipe >= 1, f"mesh.dcn_pipe must be >= 1, got {self.dcn_pipe}")
        _require(
            self.pipe == -1 or self.pipe % self.dcn_pipe == 0,
            f"mesh.dcn_pipe={self.dcn_pipe} must divide mesh.pipe ({self.pipe}): each slice holds the same number of stages",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    batch_size: int = 8  # global batch, sequences
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 2
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 100  # steps between checkpoints in workdir/checkpoints (0: only at the end)
    keep_checkpoints: int = 3
    eval_every: int = 0  # steps between eval-loss runs on the held-out split (0: only at the end)
    eval_batches: int = 4
    microbatches: int = 1  # gradient accumulation: each step sums the gradients of this many slices
    loss_vocab_chunks: int = 1  # >1: cross-entropy one vocabulary slice at a time (no full fp32 logits)
    # Pipeline parallelism (mesh.pipe > 1): microbatches each step's batch is cut into as it
    # flows through the stages (0: 4, 2 or 1 times mesh.pipe, the first that fits the
    # batch), and layer groups per stage (> 1: the circular schedule, a smaller bubble).
    pipeline_microbatches: int = 0
    pipeline_repeats: int = 1
    # With mesh.param_sharding=fsdp: gather each stage's weights once per step and hold
    # them ("step", the least communication), or let each layer gather its own every
    # pipeline iteration ("layer": R·M + P - 1 times the gathers, a layer's weights at a time).
    pipeline_gather: Literal["step", "layer"] = "step"
    # Batch-size ramp-up (GLM-130B: 192 -> 4224 over the first 2.5% of samples): the batch
    # starts at batch_size_start and grows by batch_size_increment in equal sample intervals
    # until batch_size is reached after rampup_samples sequences. 0 = no ramp-up.
    batch_size_start: int = 0
    batch_size_increment: int = 0
    rampup_samples: int = 0
    # Spike recovery: after this many consecutive bad steps (non-finite, or a loss above
    # spike_factor x its running average), restore the last checkpoint and go on with
    # the data after the bad batches. 0 = off.
    rollback_after: int = 0
    spike_factor: float = 0.0  # 0 = only non-finite steps count as bad
    tensorboard: bool = True  # scalars to workdir/tensorboard (process 0 only)
    # Compiled programs kept in workdir/compile_cache, so a restarted or resumed run skips
    # XLA compilation (minutes for large models). JAX_COMPILATION_CACHE_DIR, if set, wins.
    compile_cache: bool = True
    # Resuming a workdir whose saved model/data config differs from this one is refused
    # (its checkpoints belong to another run); true says the change is intended.
    allow_config_change: bool = False
    # Start from these parameters (a params directory from python -m glm_jax.convert, or
    # another run's workdir, its newest checkpoint) with a fresh optimizer and schedule:
    # fine-tuning. Any mesh; stored dtypes are cast to model.param_dtype. A workdir that
    # already holds checkpoints resumes from them instead.
    init_from: Optional[str] = None
    # A step compiled ahead of time (``python -m glm_jax.compile ... --save PATH``): the run
    # loads it instead of compiling, and refuses it when the config, jax/libtpu, glm_jax's
    # code or the mesh differ from what it was compiled for. A local path or gs://.
    compiled_step: Optional[str] = None

    def validate(self) -> None:
        for key in ("checkpoint_every", "eval_every", "rollback_after", "pipeline_microbatches"):
            _require(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "eval_batches", "microbatches",
                    "loss_vocab_chunks", "pipeline_repeats"):
            _require(getattr(self, key) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        _require(
            self.batch_size % self.microbatches == 0,
            f"train.batch_size ({self.batch_size}) must be divisible by train.microbatches ({self.microbatches})",
        )
        _require(self.spike_factor == 0 or self.spike_factor > 1, f"train.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        if self.batch_size_start:
            _require(
                0 < self.batch_size_start < self.batch_size,
                f"train.batch_size_start ({self.batch_size_start}) must be between 0 and train.batch_size ({self.batch_size})",
            )
            _require(
                self.batch_size_increment > 0 and (self.batch_size - self.batch_size_start) % self.batch_size_increment == 0,
                f"train.batch_size_increment ({self.batch_size_increment}) must be > 0 and divide "
                f"train.batch_size - train.batch_size_start ({self.batch_size - self.batch_size_start})",
            )
            _require(self.rampup_samples > 0, f"train.rampup_samples must be > 0 with a ramp-up, got {self.rampup_samples}")
            for key in ("batch_size_start", "batch_size_increment"):
                _require(
                    getattr(self, key) % self.microbatches == 0,
                    f"train.{key} ({getattr(self, key)}) must be divisible by train.microbatches ({self.microbatches})",
                )
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip > 0, f"train.grad_clip must be > 0, got {self.grad_clip}")
        for key in ("adam_b1", "adam_b2"):
            _require(0.0 <= getattr(self, key) < 1.0, f"train.{key} must be in [0, 1), got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed ``data.corpus`` / ``data.instructions`` value (see glm_jax/data/tasks.py)."""

    kind: str  # stdlib | text | jsonl | tfds | none
    pattern: str = ""
    field: str = "text"


def parse_source(spec: str, key: str) -> SourceSpec:
    """The one parser of source specs: stdlib | none | text:GLOB | jsonl:GLOB[:FIELD] | tfds:NAME."""
    if spec in ("stdlib", "none"):
        return SourceSpec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "text" and rest:
        return SourceSpec("text", rest)
    if kind == "jsonl" and rest:
        pattern, field = rest, "text"
        # jsonl:GLOB:FIELD — a trailing ":name" without a slash is the field
        head, sep, tail = rest.rpartition(":")
        if sep and head and "/" not in tail and not tail.startswith("//"):
            pattern, field = head, tail
        return SourceSpec("jsonl", pattern, field)
    if kind == "tfds" and rest:
        return SourceSpec("tfds", rest)
    raise ConfigError(f"{key}={spec!r} is not valid; use stdlib, text:GLOB, jsonl:GLOB[:FIELD], tfds:NAME or none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: a GLM mixture over a corpus (see glm_jax/data/tasks.py)."""

    mixture: Literal["glm130b", "glm-original", "mask", "smask", "gmask", "instructions", "chat", "synthetic"] = "glm130b"
    corpus: str = "stdlib"  # stdlib | text:GLOB | jsonl:GLOB[:FIELD] | tfds:NAME
    instructions: str = "stdlib"  # stdlib | jsonl:GLOB (prompt/response) | none
    vocab: Optional[str] = None  # SentencePiece model; None = trained on the default corpus and cached
    vocab_id_offset: int = 0  # model id = piece id - offset (20000 for ChatGLM-6B's ice_text.model)
    pack: bool = False  # pack several examples per row (segment ids, per-segment Part A lengths)
    samples_per_row: int = 1  # [MASK]/[sMASK] samples are seq_len/this long (GLM-130B: 4, packed)
    mask_ratio: float = 0.15
    gmask_min_ratio: Optional[float] = None  # None: 0.2 (GLM-130B), 0.5 for glm-original
    mask_rate: Optional[float] = None  # None: the mixture's own share
    smask_rate: Optional[float] = None
    gmask_rate: Optional[float] = None
    instructions_rate: Optional[float] = None
    shuffle_buffer: int = 1000
    tfds_data_dir: Optional[str] = None
    synthetic_vocab_size: int = 64  # mixture=synthetic: ordinary ids of the copy task
    # Longer documents are cut into pieces of at most this many characters as they are read
    # (bounded memory whatever the input; one line of a text file is one document).
    max_document_chars: int = 20_000
    # mixture=chat, fine-tuning on conversations (glm_jax/data/chat.py): JSON lines with a
    # prompt, a response and optionally a history of [query, answer] rounds, laid out as
    # prompt [gMASK] <sop> response <eop> with the loss on <sop>, the response and <eop>.
    # chat_validation: held-out conversations (default: a hashed 2% of data.chat).
    chat: str = "none"  # stdlib (questions about the default corpus) | jsonl:GLOB | none
    chat_validation: str = "none"
    prompt_field: str = "prompt"
    response_field: str = "response"
    history_field: str = "history"  # "" = the data has none
    # Prompt ids are cut to max_source_len - 1 and response ids to max_target_len - 2, the
    # authors' rule (0: half of train.seq_len each).
    max_source_len: int = 0
    max_target_len: int = 0
    # mixture=chat: this share of the rows replays pretraining data (data.corpus under the
    # data.replay_mixture objectives) against forgetting; 0 = chat only. The held-out split
    # is mixed the same way (bench finetune --forgetting reports the two losses apart).
    replay_rate: float = 0.0
    replay_mixture: Literal["glm130b", "glm-original", "mask", "smask", "gmask", "instructions"] = "gmask"

    def validate(self) -> None:
        parse_source(self.corpus, "data.corpus")
        parse_source(self.instructions, "data.instructions")
        _require(self.samples_per_row > 0, f"data.samples_per_row must be > 0, got {self.samples_per_row}")
        _require(0.0 < self.mask_ratio < 0.5, f"data.mask_ratio must be in (0, 0.5), got {self.mask_ratio}")
        if self.gmask_min_ratio is not None:
            _require(0.0 <= self.gmask_min_ratio <= 1.0, f"data.gmask_min_ratio must be in [0, 1], got {self.gmask_min_ratio}")
        for key in ("mask_rate", "smask_rate", "gmask_rate", "instructions_rate"):
            v = getattr(self, key)
            _require(v is None or v >= 0, f"data.{key} must be >= 0, got {v}")
        _require(self.shuffle_buffer > 0, f"data.shuffle_buffer must be > 0, got {self.shuffle_buffer}")
        _require(self.vocab_id_offset >= 0, f"data.vocab_id_offset must be >= 0, got {self.vocab_id_offset}")
        _require(self.synthetic_vocab_size > 0, f"data.synthetic_vocab_size must be > 0, got {self.synthetic_vocab_size}")
        _require(self.max_document_chars >= 1000, f"data.max_document_chars must be >= 1000, got {self.max_document_chars}")
        for key in ("chat", "chat_validation"):
            spec = getattr(self, key)
            _require(spec in ("stdlib", "none") or (spec.startswith("jsonl:") and len(spec) > 6),
                     f"data.{key}={spec!r} is not valid; use jsonl:GLOB, stdlib or none")
        for key in ("prompt_field", "response_field"):
            _require(bool(getattr(self, key)), f"data.{key} must name a JSON field")
        _require(self.max_source_len == 0 or self.max_source_len >= 2,
                 f"data.max_source_len must be 0 (half of train.seq_len) or >= 2, got {self.max_source_len}")
        _require(self.max_target_len == 0 or self.max_target_len >= 3,
                 f"data.max_target_len must be 0 (half of train.seq_len) or >= 3, got {self.max_target_len}")
        _require(0.0 <= self.replay_rate < 1.0, f"data.replay_rate must be in [0, 1), got {self.replay_rate}")
        _require(self.replay_rate == 0.0 or self.mixture == "chat",
                 f"data.replay_rate={self.replay_rate} mixes pretraining rows into fine-tuning data: it needs "
                 f"data.mixture=chat, not {self.mixture}")

    def chat_lengths(self, seq_len: int) -> tuple[int, int]:
        """(max_source_len, max_target_len) with the defaults filled in."""
        source = self.max_source_len or seq_len // 2
        return source, self.max_target_len or seq_len - source


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Which parameters a run trains (glm_jax/training/finetune.py): all of them (full), only
    the P-tuning v2 prefix encoder (ptuning; model.pre_seq_len sets its length), or only the
    LoRA adapters (lora; model.lora_rank and friends). With ptuning and lora the base is
    frozen: no gradients, no optimizer state, bit-identical after training.

    quantize_base: keep the frozen base's linears (QKV, attention output, both MLP
    projections of every layer) as weight-only INT8/INT4 in the train state, quantized
    as the authors quantize their release (glm_jax/model/linear.py), as P-tuning v2 and
    QLoRA fit a 6B base on one small accelerator. Only with ptuning or lora."""

    method: Literal["full", "ptuning", "lora"] = "full"
    quantize_base: Literal["none", "int8", "int4"] = "none"

    @property
    def base_bits(self) -> int:
        return {"none": 0, "int8": 8, "int4": 4}[self.quantize_base]

    def validate(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    workdir: Optional[str] = None

    def validate(self) -> None:
        self.model.validate()
        self.mesh.validate()
        self.train.validate()
        self.data.validate()
        self.finetune.validate()
        _require(self.finetune.method != "ptuning" or self.model.pre_seq_len > 0,
                 "finetune.method=ptuning needs model.pre_seq_len > 0, the prefix length (the authors use 128)")
        _require(self.finetune.method != "lora" or self.model.lora_rank > 0,
                 "finetune.method=lora needs model.lora_rank > 0 (e.g. 8), and model.lora_targets")
        _require(self.finetune.quantize_base == "none" or self.finetune.method != "full",
                 f"finetune.quantize_base={self.finetune.quantize_base} keeps a frozen base quantized, but "
                 "finetune.method=full trains the base: use ptuning or lora, or quantize_base=none")
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
        )
        if self.data.mixture == "chat":
            source, target = self.data.chat_lengths(self.train.seq_len)
            _require(source + target <= self.train.seq_len,
                     f"data.max_source_len ({source}) + data.max_target_len ({target}) exceed train.seq_len "
                     f"({self.train.seq_len}), the row they share")
        chunks = self.train.loss_vocab_chunks
        _require(
            self.model.vocab_size % chunks == 0,
            f"train.loss_vocab_chunks={chunks} must divide model.vocab_size ({self.model.vocab_size}); "
            f"valid values up to 64: {', '.join(str(c) for c in range(1, 65) if self.model.vocab_size % c == 0)}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks.


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}={value!r} is not valid; valid values: {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} is not valid; expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r} is not valid; expected {_describe(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    data = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    """Read a config file; a top-level ``base: FILE`` (relative to this file) is loaded first
    and this file's values are merged over it."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {path} must be a file name, got {base!r}")
    parent = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (real,))
    return _merge(parent, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The configs shipped inside the package (glm_jax/configs/NAME.yaml; `configs/` at the top of
# a checkout links to the same files).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list[str]:
    """Names of the shipped configs (``glm-tiny``, ``chatglm-6b``, ...)."""
    return sorted(n[: -len(".yaml")] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))


def resolve_config(path_or_name: str) -> str:
    """A config file: an existing path as given, else a shipped config by name
    (``chatglm-6b`` or ``chatglm-6b.yaml``), from any working directory."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name.removesuffix(".yaml")
    shipped = os.path.join(CONFIG_DIR, name + ".yaml")
    if os.sep not in path_or_name and os.path.isfile(shipped):
        return shipped
    raise ConfigError(f"config file not found: {path_or_name}; shipped configs: {', '.join(shipped_configs())}")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Load the YAML at ``path`` (a file, or the name of a shipped config; None: all
    defaults), apply ``key=value`` overrides, validate."""
    data = _read_yaml(resolve_config(path)) if path is not None else {}
    return config_from_dict(data, overrides)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    return d


# Model keys that change neither the parameters nor the arithmetic: a run may resume with
# other values (a different kernel, block size or rematerialisation).
RESUME_NEUTRAL_KEYS = frozenset({
    "model.attention_impl", "model.attention_block_q", "model.attention_block_kv", "model.attention_block_q_bwd",
    "model.attention_block_kv_bwd", "model.remat_policy",
})


# Model keys in which a run may differ from the checkpoint it starts from
# (train.init_from): how it computes and regularises, not what the weights mean.
# Parameter shapes are compared separately (max_seq_len sizes learned position tables).
INIT_FROM_NEUTRAL_KEYS = RESUME_NEUTRAL_KEYS | frozenset({
    "model.name", "model.attention_dropout", "model.hidden_dropout", "model.dtype", "model.param_dtype", "model.init",
    "model.init_std", "model.embedding_grad_shrink", "model.max_seq_len", "model.pre_seq_len", "model.prefix_projection",
    "model.prefix_dropout", "model.lora_rank", "model.lora_alpha", "model.lora_dropout", "model.lora_targets",
})


# Keys of model/mesh/train/data that do not enter the compiled train step: a step compiled
# ahead of time (train.compiled_step) serves runs that differ only in these (and in
# workdir). Everything else (the model, the mesh, the optimizer and its schedule, the
# batch) is compiled into the step. Of the data keys only data.pack shapes the batch; the
# rest choose what fills it.
STEP_NEUTRAL_KEYS = frozenset({
    "model.name",
    *(f"train.{k}" for k in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches",
                            "batch_size_start", "batch_size_increment", "rampup_samples", "rollback_after",
                            "spike_factor", "tensorboard", "compile_cache", "allow_config_change", "compiled_step",
                            "init_from")),
    *(f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name != "pack"),
})


def differences(old: Config, new: Config, sections: Sequence[str] = ("model", "data"),
                neutral: frozenset = RESUME_NEUTRAL_KEYS) -> list[str]:
    """``section.key: old -> new`` for every key of ``sections`` whose value differs,
    leaving out those that cannot change what is compared (``neutral``: by default
    RESUME_NEUTRAL_KEYS, those that cannot change what a run computes)."""
    out = []
    for section in sections:
        a, b = dataclasses.asdict(getattr(old, section)), dataclasses.asdict(getattr(new, section))
        for key in a:
            full = f"{section}.{key}"
            if a[key] != b[key] and full not in neutral:
                out.append(f"{full}: {a[key]!r} -> {b[key]!r}")
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
