"""Load a converted checkpoint or a training run and use it: ``load(dir).logits(ids)``,
``.generate(ids)``.

    model = load("chatglm-6b-jax")          # from `python -m glm_jax.convert from-hf`
    logits = model.logits(input_ids)         # [batch, seq] ints -> [batch, seq, vocab] float32
    out = model.generate(input_ids, max_new_tokens=64)   # prompt + new tokens, greedy
    small = load("chatglm-6b-jax", quantize=4)            # INT4 weights on the device

The caller passes token ids only. Positions and the Part A length are built from them
by the authors' rules (``glm_jax.model.positions.prepare_inputs``): Part A is everything
before ``<sop>``; with ``[gMASK]`` (ChatGLM: 2D positions) the position row holds the
mask's index from ``<sop>`` on and the block row counts 1, 2, ... there; leading
``pad_token_id`` tokens are left padding. So ``[t0 .. tn, [gMASK], <sop>, ...]`` gives
the logits the authors' model gives for the same ids.

A directory is either a converted checkpoint (``config.yaml`` + ``params/``, and
``quantized/`` when converted from an INT8/INT4 release) or a training workdir
(``config.yaml`` + ``checkpoints/``: the newest committed step's parameters are read,
nothing else). Parameters are read leaf by leaf, so a pre-quantized checkpoint never
holds its dense linears in memory.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

# `import glm_jax` imports this module, and must not import jax (a CLI's --help, config
# checks and the converters stay fast): everything that needs jax is imported inside the
# methods that use it.
from glm_jax.checkpoint import authors_layout, directory, params, quantized
from glm_jax.config import ConfigError, ModelConfig
from glm_jax.errors import UnreadableCheckpoint, UserError, one_line

Bits = Union[int, str, None]


def parse_bits(value: Bits) -> Optional[int]:
    """``None`` (as stored), ``0``/``"none"`` (float), ``8``/``"int8"``, ``4``/``"int4"``."""
    if value is None:
        return None
    names = {"none": 0, "float": 0, "0": 0, "int8": 8, "8": 8, "int4": 4, "4": 4}
    key = str(value).lower()
    if key not in names:
        raise ConfigError(f"quantize={value!r} is not valid; valid values: none, int8, int4 (or 0, 8, 4)")
    return names[key]


@dataclasses.dataclass
class LoadedModel:
    """A model config and its parameters (float or weight-only quantized), on the device(s),
    laid out for generation (``glm_jax.inference.weights``): ``config`` is the checkpoint's
    model unrolled (``scan_layers=False``), and ``params`` match it."""

    config: ModelConfig
    params: Any
    mesh: Any = None
    _apply: Any = dataclasses.field(default=None, repr=False)
    _generator: Any = dataclasses.field(default=None, repr=False)

    def _check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {ids.shape} (wrap a single sequence in a list)")
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a [batch, seq] integer array; got {ids.dtype} of shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); got [{ids.min()}, {ids.max()}]")
        return ids

    def logits(self, input_ids) -> np.ndarray:
        """``[batch, seq]`` integer ids -> ``[batch, seq, vocab]`` float32 logits."""
        import jax

        from glm_jax.model import GLM, prepare_inputs

        ids = self._check_ids(input_ids)
        inputs = prepare_inputs(ids, self.config)
        if self._apply is None:
            self._apply = jax.jit(GLM(self.config).apply)
        out = self._apply({"params": self.params}, ids.astype(np.int32), inputs["positions"], inputs["prefix_len"], inputs["segment_ids"])
        return np.asarray(out, dtype=np.float32)

    @property
    def generator(self):
        """The compiled KV-cache generation loop (``glm_jax.inference.decode.Generator``)."""
        from glm_jax.inference.decode import Generator

        if self._generator is None:
            self._generator = Generator(self.config, self.params, mesh=self.mesh)
        return self._generator

    def generate(self, input_ids, max_new_tokens: int = 32, sampling=None, *, bucket: int = 1, **options) -> np.ndarray:
        """``[batch, seq]`` prompt ids (``text [gMASK] <sop>``, left-padded with pad_token_id;
        a list of rows of different lengths is padded for you) -> the prompts followed by
        ``max_new_tokens`` new ids, greedy unless ``sampling`` (a
        ``glm_jax.inference.sampling.Sampling``) or its fields (``greedy=False,
        temperature=, top_k=, top_p=, repetition_penalty=, seed=``) say otherwise, or a
        beam search's best hypothesis with ``num_beams=`` > 1 (and ``length_penalty=,
        no_repeat_ngram_size=, min_gen_length=``: :meth:`beam_search`). An example
        stops at ``<eop>`` or eos; pad fills the rest of its row. ``bucket`` left-pads the
        prompts to a multiple of it, so that prompts of nearby lengths share one compiled
        program (the padding changes no token)."""
        beam_options = {k: options.pop(k) for k in list(options) if k in _beam_fields()}
        if beam_options.get("num_beams", 1) > 1:
            if sampling is not None or options:
                raise ValueError("beam search is deterministic: pass num_beams= without sampling options")
            hyps = self.beam_search(input_ids, max_new_tokens, bucket=bucket, **beam_options)
            prompts = self.generator.prompt_rows(input_ids, max_new_tokens, bucket)
            out = np.full((len(hyps), max_new_tokens), self.config.pad_token_id, prompts.dtype)
            for row, h in zip(out, hyps):
                best = list(h[0].tokens) + ([h[0].stop] if h[0].stop is not None else [])
                row[: len(best)] = best
            return np.concatenate([prompts, out], axis=1)
        if beam_options and set(beam_options) != {"num_beams"}:
            raise ValueError(f"{sorted(beam_options)[0]} is a beam search option: pass num_beams= > 1 too")
        return self.generator.generate(input_ids, max_new_tokens, _sampling(sampling, options), bucket=bucket)

    def beam_search(self, input_ids, max_new_tokens: int = 32, *, bucket: int = 1, **options):
        """Each prompt's hypotheses, best first (``glm_jax.inference.beam_search.Hypothesis``:
        tokens, penalized score, the stop token that ended it), by GLM-130B's beam search;
        options are :class:`glm_jax.inference.beam_search.BeamSearch`'s fields
        (``num_beams=4, length_penalty=1.0, no_repeat_ngram_size=0, min_gen_length=0,
        banned_tokens=(), banned_prefixes=()``)."""
        from glm_jax.inference.beam_search import BeamSearch

        unknown = sorted(set(options) - _beam_fields())
        if unknown:
            raise ValueError(f"unknown beam search option {unknown[0]!r}; valid: {', '.join(sorted(_beam_fields()))}")
        return self.generator.beam_search(input_ids, max_new_tokens, BeamSearch(**options), bucket=bucket)

    def stream(self, input_ids, max_new_tokens: int = 32, sampling=None, *, chunk: int = 8, bucket: int = 1, **options):
        """Like :meth:`generate`, yielding ``[batch, n]`` blocks of new ids as they are produced."""
        return self.generator.stream(input_ids, max_new_tokens, _sampling(sampling, options), chunk=chunk, bucket=bucket)

    def fill_blanks(self, rows: Sequence[Sequence[int]], max_new_tokens: int = 32, sampling=None, **options):
        """GLM-130B's blank filling (MODEL.md §1.6); see ``glm_jax.inference.blanks``."""
        from glm_jax.inference.blanks import fill_blanks

        return fill_blanks(self.generator, rows, max_new_tokens, _sampling(sampling, options))

    def quantize(self, bits: Bits) -> "LoadedModel":
        """A copy with the four linears of every layer quantized to ``bits`` (8 or 4)."""
        from glm_jax.inference import quantize as qz

        n = parse_bits(bits)
        if not n:
            raise ConfigError(f"quantize needs int8 or int4, got {bits!r}")
        if qz.is_quantized(self.params):
            raise ConfigError("these parameters are already quantized; load the checkpoint with quantize=... instead")
        from glm_jax.inference.weights import as_float

        return _placed(self.config, qz.quantize(as_float(self.params), self.config, n), self.mesh)


def _beam_fields() -> set:
    from glm_jax.inference.beam_search import BeamSearch  # imports jax: only once generation runs

    return {f.name for f in dataclasses.fields(BeamSearch)}


def _sampling(sampling, options: dict):
    from glm_jax.inference.sampling import Sampling

    if sampling is not None and options:
        raise ValueError("pass either sampling= or its fields, not both")
    if sampling is None:
        fields = {f.name for f in dataclasses.fields(Sampling)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown generation option {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
        sampling = Sampling(**options)
    return sampling


def _placed(cfg: ModelConfig, params: Any, mesh) -> LoadedModel:
    """The parameters in the generation layout (``glm_jax.inference.weights``) on the device(s)."""
    import jax

    from glm_jax.inference.weights import for_generation

    if mesh is None:
        cfg, params = for_generation(cfg, params, place=lambda path, w: jax.device_put(w))
    else:
        from glm_jax.inference.decode import param_shardings

        cfg, params = for_generation(cfg, params, mesh=mesh)
        params = jax.device_put(params, param_shardings(cfg, params, mesh))
    return LoadedModel(config=cfg, params=params, mesh=mesh)


def load(checkpoint_dir: str, *, dtype: Optional[str] = None, quantize: Bits = None, mesh=None,
         step: Optional[int] = None, warn: Optional[Callable[[str], None]] = None,
         prefix: Optional[Callable[[ModelConfig], tuple[ModelConfig, dict]]] = None,
         adapter: Optional[Callable[[ModelConfig], tuple[ModelConfig, dict]]] = None) -> LoadedModel:
    """Restore ``checkpoint_dir`` (a converted checkpoint or a training workdir).

    dtype: compute dtype override (converted checkpoints compute in float32; parameters
      keep their stored dtypes and are cast inside the model).
    quantize: None keeps what is stored (an INT8/INT4 release stays quantized, with its
      own tensors); 0/"none" gives float weights; 8/"int8" or 4/"int4" quantizes
      (``glm_jax.inference.quantize``), reusing stored tensors of the same width.
    mesh: a ``jax.sharding.Mesh`` to place the parameters on, split by the logical-axis
      rules (heads and the MLP over ``model``), for models larger than one device.
    step: which checkpoint of a training workdir (default: the newest; a newest checkpoint
      that cannot be read is passed over for the one before, with one ``warn`` line,
      default to stderr). A named step that cannot be read is a CheckpointError.
    prefix: a P-tuning prefix to add, as ``prefix(base config) -> (config with the prefix,
      prefix encoder parameters)`` (``glm_jax.load(..., ptuning_checkpoint=...)`` passes
      ``glm_jax.convert.ptuning.read``); it stays float32 whatever the base's weights are.
    adapter: LoRA adapters to add, as ``adapter(base config) -> (config with the adapters,
      {leaf path: array})`` (``glm_jax.load(..., lora_adapter=...)`` passes
      ``glm_jax.convert.lora_adapter.read``). Adapters, these or a LoRA run's own, are merged
      into the kernels before any quantization, so generation costs what the base costs.
    """
    from glm_jax.inference import quantize as qz  # imports jax: not at `import glm_jax`

    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    sources = directory.candidates(checkpoint_dir, step)
    for i, source in enumerate(sources):
        try:
            cfg, tree = _read(source, dtype, parse_bits(quantize), qz, adapter)
            break
        except UserError as e:
            if not isinstance(e, UnreadableCheckpoint):
                raise  # the checkpoint disagrees with its config: an older one will not do better
            problem = e
        except Exception as e:  # tensorstore's errors for a torn or damaged file
            problem = e
        if i + 1 == len(sources):
            raise UnreadableCheckpoint(f"{source.describe()} cannot be read ({one_line(problem)})") from None
        warn(f"{source.describe()} cannot be read ({one_line(problem)}); loading step {sources[i + 1].step} instead")
    if prefix is not None:
        cfg, tree["prefix_encoder"] = prefix(cfg)
    return _placed(cfg, tree, mesh)


def _read(source: directory.Source, dtype: Optional[str], bits: Optional[int], qz, adapter=None) -> tuple[ModelConfig, Any]:
    """The model config and the parameter tree (numpy, LoRA merged, quantized as asked) of one source."""
    stored = params.open_params(source)
    cfg = stored.config
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        cfg.validate()
    have = params.stored_bits(source)
    bits = have if bits is None else bits
    merging = bool(cfg.lora_rank) or adapter is not None
    # With the release's own quantized tensors, the dense copies of the linears are not read
    # (unless adapters are merged into them: then the dense weights are quantized afresh).
    keep = set()
    if bits and bits == have and not merging:
        keep = {e.path for e in authors_layout.entries(cfg) if quantized.is_quantized_linear(e.key)}
    tree = stored.tree(skip=keep)
    if adapter is not None:
        if cfg.lora_rank:
            raise UserError(f"{source.describe()} already has LoRA adapters (model.lora_rank={cfg.lora_rank}); "
                            "load it without another adapter")
        from flax import traverse_util  # only to merge an adapter: plain loads skip flax's import

        cfg, leaves = adapter(cfg)
        flat = traverse_util.flatten_dict(tree)
        flat.update(leaves)
        tree = traverse_util.unflatten_dict(flat)
    if cfg.lora_rank:
        from glm_jax.model import lora  # imports jax: only when adapters are merged

        tree, cfg = lora.merge(tree, cfg)
    if keep:
        tree = qz.from_authors(tree, cfg, bits, quantized.KeptTensors(source.quantized_dir).pair)
    elif bits:
        tree = qz.quantize(tree, cfg, bits)
    return cfg, tree
