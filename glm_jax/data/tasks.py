"""The seqio task registry: corpora, GLM objectives, and the GLM mixtures.

A corpus is named in config by a spec string (``data.corpus``):

  stdlib               the default corpus (Python stdlib docstrings, built here; corpus.py)
  text:GLOB            text files, one document per line (local paths or gs://)
  jsonl:GLOB[:FIELD]   JSON lines, the document in FIELD (default "text")
  tfds:NAME            a TFDS dataset already prepared under data.tfds_data_dir (pod runs)

and instruction data by ``data.instructions``: ``stdlib`` (questions about stdlib
functions, answered by their docstrings' first paragraph), ``jsonl:GLOB`` with fields
``prompt`` and ``response``, or ``none``.

For a corpus, tasks ``glm.<key>.mask``, ``.smask`` and ``.gmask`` apply one objective
each; ``glm.<key>.instructions`` lays out the pairs. ``register(cfg, vocab)`` registers
them and returns the mixture the config asks for (``data.mixture``):

  glm130b       95% blank infilling (30% [MASK], 70% [gMASK], r=0.2), 5% instructions (MODEL.md §3.3)
  glm-original  50% [MASK], 30% [sMASK], 20% [gMASK] with r=0.5 (MODEL.md §3.2, GLM-10B)
  mask | smask | gmask | instructions   one objective alone
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Iterator, Optional

from glm_jax.config import Config, ConfigError, SourceSpec, parse_source
from glm_jax.data import corpus
from glm_jax.data import infilling as inf
from glm_jax.data import preprocessors as prep

# TensorFlow and seqio are imported inside the functions that use them: they take seconds to
# import, and config checks, the synthetic mixture and the jax-only tools never need them.

# What readers skipped or repaired, per process (shown by inspect and bench).
STATS: collections.Counter = collections.Counter()

MIXTURES = {
    # objective -> share, before data.*_rate overrides
    "glm130b": {"mask": 0.95 * 0.3, "gmask": 0.95 * 0.7, "instructions": 0.05},
    "glm-original": {"mask": 0.5, "smask": 0.3, "gmask": 0.2},
    "mask": {"mask": 1.0},
    "smask": {"smask": 1.0},
    "gmask": {"gmask": 1.0},
    "instructions": {"instructions": 1.0},
}
GMASK_MIN_RATIO = {"glm-original": 0.5}  # else 0.2, GLM-130B's
READ_BLOCK = prep.BLOCK  # documents per Python -> TensorFlow hand-over


def _glob(pattern: str) -> list[str]:
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise ConfigError(f"no file matches {pattern}")
    return files


def _in_split(doc: str, split: str) -> bool:
    held_out = int(hashlib.sha1(doc.encode("utf-8", "replace")).hexdigest(), 16) % 100 < corpus.VALIDATION_PERCENT
    return held_out if split == "validation" else not held_out


def read_lines(files: list[str], *, fmt: str, fields: tuple[str, ...], split: str, escaped: bool = False,
               split_by_hash: bool = True) -> Iterator[tuple[str, ...]]:
    """Documents (or field tuples) from files, one per line. Never stops early on bad input:
    unreadable files, invalid JSON and empty documents are skipped and counted in STATS;
    invalid UTF-8 is replaced (U+FFFD) and counted."""
    import tensorflow as tf

    for path in files:
        try:
            f = tf.io.gfile.GFile(path, "rb")
            lines = iter(f)
        except (tf.errors.OpError, OSError):
            STATS["unreadable_files"] += 1
            continue
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (tf.errors.OpError, OSError):
                STATS["unreadable_files"] += 1
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                STATS["invalid_utf8_documents"] += 1
            line = line.rstrip("\r\n")
            if fmt == "jsonl":
                if not line.strip():
                    STATS["empty_documents"] += 1
                    continue
                try:
                    obj = json.loads(line)
                    values = tuple(obj[k] for k in fields)
                    if not all(isinstance(v, str) for v in values):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    STATS["unreadable_documents"] += 1
                    continue
            else:
                values = (corpus.unescape(line) if escaped else line,)
            if not values[0].strip():
                STATS["empty_documents"] += 1
                continue
            if split_by_hash and not _in_split(values[0], split):
                continue
            STATS["documents"] += 1
            yield values


def _text_source(spec: SourceSpec, fields: tuple[str, ...]):
    import seqio
    import tensorflow as tf

    if spec.kind == "stdlib":
        paths = corpus.build()
        if fields == ("text",):
            files = {"train": [paths["train"]], "validation": [paths["validation"]]}
            fmt, escaped, by_hash = "text", True, False
        else:
            files = {s: [paths["instructions"]] for s in ("train", "validation")}
            fmt, escaped, by_hash = "jsonl", False, True
    else:
        found = _glob(spec.pattern)
        files = {"train": found, "validation": found}
        fmt, escaped, by_hash = spec.kind, False, True
    keys = fields  # the features this source yields
    json_fields = (spec.field,) if fields == ("text",) else fields  # where a JSON line holds them

    def dataset_fn(split, shuffle_files, seed=None):
        def gen():
            # Documents cross from Python to TensorFlow in blocks: per-element crossings cost more
            # than reading the text.
            block = {k: [] for k in keys}
            for values in read_lines(files[split], fmt=fmt, fields=json_fields, split=split, escaped=escaped, split_by_hash=by_hash):
                for k, v in zip(keys, values):
                    block[k].append(v)
                if len(block[keys[0]]) == READ_BLOCK:
                    yield block
                    block = {k: [] for k in keys}
            if block[keys[0]]:
                yield block

        sig = {k: tf.TensorSpec((None,), tf.string) for k in keys}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)  # blocks, see preprocessors

    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


def _tfds_source(spec: SourceSpec, data_dir: Optional[str]):
    import seqio
    import tensorflow as tf

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    name, _, _ = spec.pattern.partition(":")
    path = os.path.join(data_dir, *name.split("/")) if data_dir else None
    if not path or not tf.io.gfile.exists(path):
        raise ConfigError(
            f"TFDS dataset {spec.pattern} is not prepared under data.tfds_data_dir={data_dir!r} and cannot be "
            "downloaded here; build it where there is network (tfds build) and point data.tfds_data_dir at it"
        )
    return seqio.TfdsDataSource(tfds_name=spec.pattern, tfds_data_dir=data_dir)


def _output_features(vocab_size: int):
    import seqio
    import tensorflow as tf

    ints = seqio.PassThroughVocabulary(size=vocab_size)
    return {
        "tokens": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
        "targets": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
        "loss_weights": seqio.Feature(ints, add_eos=False, dtype=tf.float32),
        "positions": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
        "block_positions": seqio.Feature(ints, add_eos=False, dtype=tf.int32),
    }


def _add(task_or_mixture, registry) -> None:
    registry.remove(task_or_mixture.name)
    registry.add_provider(task_or_mixture.name, task_or_mixture)


def mixture_rates(cfg: Config) -> dict[str, float]:
    d = cfg.data
    rates = dict(MIXTURES[d.mixture])
    for obj in ("mask", "smask", "gmask", "instructions"):
        override = getattr(d, f"{obj}_rate")
        if override is not None:
            rates[obj] = override
    rates = {k: v for k, v in rates.items() if v > 0}
    if "instructions" in rates and d.instructions == "none":
        rates.pop("instructions")
    if not rates:
        raise ConfigError(f"data.mixture={d.mixture} with these rates selects no objective")
    return rates


def register(cfg: Config, vocab) -> str:
    """Register the tasks and mixture ``cfg.data`` describes; return the name to read from."""
    import seqio

    d, m = cfg.data, cfg.model
    length = cfg.train.seq_len
    one_d = not m.two_d_positions
    ids = inf.SpecialIds.from_model(m)
    rates = mixture_rates(cfg)
    key = hashlib.sha1(json.dumps([dataclasses.asdict(d), dataclasses.asdict(m), length, vocab.path]).encode()).hexdigest()[:10]
    feats = _output_features(m.vocab_size)
    sample_len = max(4, length // d.samples_per_row)
    gmin = d.gmask_min_ratio if d.gmask_min_ratio is not None else GMASK_MIN_RATIO.get(d.mixture, 0.2)
    # Raw chunk sizes that always fit: [MASK]/[sMASK] add 2 tokens per span (<= 0.15n + 1 spans).
    short = int((sample_len - 2) / (1 + 2 * d.mask_ratio)) - 2
    chunk_for = {"mask": short, "smask": short, "gmask": length - 2}
    tasks = []
    corpus_spec = parse_source(d.corpus, "data.corpus")
    for obj in ("mask", "smask", "gmask"):
        if obj not in rates:
            continue
        if corpus_spec.kind == "none":
            raise ConfigError(f"data.corpus=none but data.mixture={d.mixture} needs a corpus for {obj}")
        source = _tfds_source(corpus_spec, d.tfds_data_dir) if corpus_spec.kind == "tfds" else _text_source(corpus_spec, ("text",))
        objective = prep.blank_infilling(
            obj, ids, one_d=one_d, mask_ratio=d.mask_ratio, gmask_min_ratio=gmin,
            ends_sentence=vocab.sentence_end_table() if obj == "smask" else None, budget=sample_len - chunk_for[obj],
        )
        name = f"glm.{key}.{obj}"
        _add(
            seqio.Task(
                name,
                source,
                output_features=feats,
                preprocessors=[
                    prep.as_blocks(("text",)),
                    prep.tokenize(vocab.encode_tf),
                    prep.chunk(max(1, chunk_for[obj])),
                    objective,
                ],
                shuffle_buffer_size=d.shuffle_buffer,
            ),
            seqio.TaskRegistry,
        )
        tasks.append((name, rates[obj]))
    if "instructions" in rates:
        spec = parse_source(d.instructions, "data.instructions")
        if spec.kind not in ("stdlib", "jsonl"):
            raise ConfigError(f"data.instructions={d.instructions!r} is not valid; use stdlib, jsonl:GLOB or none")
        name = f"glm.{key}.instructions"
        _add(
            seqio.Task(
                name,
                _text_source(spec, ("prompt", "response")),
                output_features=feats,
                preprocessors=[
                    prep.as_blocks(("prompt", "response")),
                    prep.tokenize(vocab.encode_tf, ("prompt", "response"), ("prompt", "response")),
                    prep.instruction(ids, one_d=one_d, max_len=length),
                ],
                shuffle_buffer_size=d.shuffle_buffer,
            ),
            seqio.TaskRegistry,
        )
        tasks.append((name, rates["instructions"]))
    if len(tasks) == 1:
        return tasks[0][0]
    name = f"glm.{key}.{d.mixture}"
    _add(seqio.Mixture(name, tasks), seqio.MixtureRegistry)
    return name
