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
import functools
import hashlib
import json
import os
from typing import Callable, Iterator, Optional, Union

from glm_jax.config import Config, ConfigError, DataConfig, SourceSpec, parse_source
from glm_jax.data import chat, corpus
from glm_jax.data import infilling as inf
from glm_jax.data import preprocessors as prep

# TensorFlow and seqio are imported inside the functions that use them: they take seconds to
# import, and config checks, the synthetic mixture and the jax-only tools never need them.

# What readers skipped or repaired, per process (shown by train, inspect and bench),
# counted once per file whatever the number of passes over it.
STATS: collections.Counter = collections.Counter()
_COUNTED: set = set()
BINARY_PROBE = 8192  # a file with a NUL byte in its first 8 KiB is binary, not text

MIXTURES = {
    # objective -> share, before data.*_rate overrides
    "glm130b": {"mask": 0.95 * 0.3, "gmask": 0.95 * 0.7, "instructions": 0.05},
    "glm-original": {"mask": 0.5, "smask": 0.3, "gmask": 0.2},
    "mask": {"mask": 1.0},
    "smask": {"smask": 1.0},
    "gmask": {"gmask": 1.0},
    "instructions": {"instructions": 1.0},
    "chat": {"chat": 1.0},  # fine-tuning on data.chat alone (register builds it apart)
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
               split_by_hash: bool = True, max_chars: int = 0,
               parse: Optional[Callable[[object], Union[tuple[str, ...], str]]] = None) -> Iterator[tuple[str, ...]]:
    """Documents (or field tuples) from files, one per line. Never stops early on bad input:
    unreadable and binary files, invalid JSON, missing fields and empty documents are
    skipped and counted in STATS; invalid UTF-8 is replaced (U+FFFD) and counted.

    max_chars > 0 bounds what one document can cost: a longer plain document is cut into
    pieces of at most that many characters (at whitespace where it can), counted as
    ``cut_documents``; a longer field tuple (instructions) is skipped as
    ``oversized_documents``. Counts are taken on the first pass over each file only, so
    they do not grow as the data repeats. ``parse`` (JSON lines): the values of a parsed
    line, or the STATS key of the reason it is skipped; by default ``fields``' strings.
    """
    import tensorflow as tf

    for path in files:
        # Counted once: a file's problems on its first read only, and per-document skips in
        # one split's pass (both splits read every line of a shared file).
        key = (path, split, fmt, fields)
        stats = STATS if key not in _COUNTED else collections.Counter()
        file_stats = STATS if path not in _COUNTED else collections.Counter()
        skips = stats if not split_by_hash or split == "train" else collections.Counter()
        _COUNTED.add(path)
        try:
            f = tf.io.gfile.GFile(path, "rb")
            if is_binary(f.read(BINARY_PROBE)):
                file_stats["binary_files"] += 1
                _COUNTED.add(key)
                continue
            f.seek(0)
            lines = iter(f)
        except (tf.errors.OpError, OSError):
            file_stats["unreadable_files"] += 1
            _COUNTED.add(key)
            continue
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (tf.errors.OpError, OSError):
                file_stats["unreadable_files"] += 1
                break
            if b"\0" in raw:
                skips["binary_documents"] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                skips["invalid_utf8_documents"] += 1
            line = line.rstrip("\r\n")
            if fmt == "jsonl":
                if not line.strip():
                    skips["empty_documents"] += 1
                    continue
                try:
                    obj = json.loads(line)
                    if parse is None:
                        values = tuple(obj[k] for k in fields)
                        if not all(isinstance(v, str) for v in values):
                            raise TypeError
                    else:
                        values = parse(obj)
                except (ValueError, KeyError, TypeError, RecursionError):
                    skips["unreadable_documents"] += 1
                    continue
                if isinstance(values, str):
                    skips[values] += 1
                    continue
            else:
                values = (corpus.unescape(line) if escaped else line,)
            if not values[0].strip():
                skips["empty_documents"] += 1
                continue
            if split_by_hash and not _in_split(values[0], split):
                continue
            stats["documents"] += 1
            if max_chars and any(len(v) > max_chars for v in values):
                if len(values) > 1:
                    stats["oversized_documents"] += 1
                    continue
                stats["cut_documents"] += 1
                yield from ((piece,) for piece in cut(values[0], max_chars))
                continue
            yield values
        _COUNTED.add(key)


_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"


def is_binary(probe: bytes) -> bool:
    """A file's first bytes look like data, not text: a NUL byte and more than 5% control
    bytes (a text file with a stray NUL loses only that line)."""
    if b"\0" not in probe:
        return False
    return sum(probe.count(c) for c in _CONTROL) > 0.05 * len(probe)


def cut(text: str, max_chars: int) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars`` characters, each ending at the last
    whitespace of its window when there is one in its second half."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        space = text.rfind(" ", start + max_chars // 2, end)
        end = space + 1 if space >= 0 else end
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def reset_stats() -> None:
    """Forget what the readers counted (the next pass over each file counts again)."""
    STATS.clear()
    _COUNTED.clear()


READ_COUNTS = frozenset({"documents", "chat_examples"})  # what was read, not skipped or changed


def skipped_input() -> dict[str, int]:
    """What the readers passed over or changed so far (files, documents), by reason."""
    return {k: v for k, v in STATS.items() if k not in READ_COUNTS and v}


def check_sources(d: DataConfig) -> None:
    """Fail fast (ConfigError) when a source names files that do not exist, or chat files
    with no usable conversation: checked before anything is built or written, rather than
    when the first batch is read."""
    if d.mixture == "chat":
        if d.chat == "none":
            raise ConfigError("data.mixture=chat needs data.chat=jsonl:GLOB (or stdlib for the built-in questions)")
        for key in ("chat", "chat_validation"):
            if getattr(d, key).startswith("jsonl:"):
                _check_chat_files(d, key)
        if not d.replay_rate:
            return
        if parse_source(d.corpus, "data.corpus").kind == "none":
            raise ConfigError(f"data.replay_rate={d.replay_rate} replays pretraining rows from data.corpus, "
                              "which is none: name the pretraining corpus")
    for spec in (parse_source(d.corpus, "data.corpus"), parse_source(d.instructions, "data.instructions")):
        if spec.kind in ("text", "jsonl"):
            _glob(spec.pattern)


def _chat_parser(d: DataConfig) -> Callable:
    return functools.partial(chat.read_example, prompt_field=d.prompt_field, response_field=d.response_field,
                             history_field=d.history_field)


def _check_chat_files(d: DataConfig, key: str) -> None:
    """ConfigError unless the chat files of ``data.<key>`` hold a usable line; reads only
    up to the first one."""
    import tensorflow as tf

    pattern = getattr(d, key)[len("jsonl:"):]
    files, parse, reasons = _glob(pattern), _chat_parser(d), collections.Counter()
    for path in files:
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                for raw in f:
                    try:
                        got = parse(json.loads(raw.decode("utf-8", errors="replace")))
                    except (ValueError, RecursionError):
                        got = "lines that are not JSON"
                    if not isinstance(got, str):
                        return
                    reasons[got] += 1
        except (tf.errors.OpError, OSError):
            reasons["unreadable files"] += 1
    found = ", ".join(f"{n} {why.replace('_documents', ' lines').replace('_', ' ')}" for why, n in reasons.most_common())
    raise ConfigError(
        f"data.{key}={getattr(d, key)}: no usable conversation in {len(files)} file(s) ({found or 'they are empty'}); "
        f"each line needs string fields data.prompt_field={d.prompt_field!r} and data.response_field="
        f"{d.response_field!r}, both non-empty" + (f", and data.history_field={d.history_field!r} if present a list "
                                                    "of [query, answer] pairs" if d.history_field else "")
    )


def _chat_source(d: DataConfig, spell: Callable[[str], str]):
    """(prompt text, response text) of each conversation, in the authors' format
    (``glm_jax.data.chat``) and spelled for the vocabulary. Held out: data.chat_validation,
    or else a hashed share of data.chat."""
    import seqio
    import tensorflow as tf

    def files(spec: str) -> list[str]:
        return [corpus.build()["instructions"]] if spec == "stdlib" else _glob(spec[len("jsonl:"):])

    separate = d.chat_validation != "none"
    by_split = {"train": files(d.chat), "validation": files(d.chat_validation if separate else d.chat)}
    parse = _chat_parser(d)
    fields = ("chat", d.prompt_field, d.response_field, d.history_field)  # the readers' counting key

    def dataset_fn(split, shuffle_files, seed=None):
        def gen():
            block = {"prompt": [], "response": []}
            for prompt, response in read_lines(by_split[split], fmt="jsonl", fields=fields, split=split,
                                               split_by_hash=not separate, max_chars=d.max_document_chars, parse=parse):
                block["prompt"].append(spell(prompt))
                block["response"].append(spell(response))
                if len(block["prompt"]) == READ_BLOCK:
                    yield block
                    block = {"prompt": [], "response": []}
            if block["prompt"]:
                yield block

        sig = {k: tf.TensorSpec((None,), tf.string) for k in ("prompt", "response")}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)

    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


def _text_source(spec: SourceSpec, fields: tuple[str, ...], max_chars: int = 0,
                 spell: Callable[[str], str] = lambda text: text):
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
            for values in read_lines(files[split], fmt=fmt, fields=json_fields, split=split, escaped=escaped,
                                     split_by_hash=by_hash, max_chars=max_chars):
                for k, v in zip(keys, values):
                    block[k].append(spell(v))
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


def mixture_rates(cfg: Config, mixture: Optional[str] = None) -> dict[str, float]:
    """Each objective's share in ``mixture`` (default ``data.mixture``), after the overrides."""
    d = cfg.data
    mixture = mixture or d.mixture
    rates = dict(MIXTURES[mixture])
    for obj in ("mask", "smask", "gmask", "instructions"):
        override = getattr(d, f"{obj}_rate")
        if override is not None:
            rates[obj] = override
    rates = {k: v for k, v in rates.items() if v > 0}
    if "instructions" in rates and d.instructions == "none":
        rates.pop("instructions")
    if not rates:
        raise ConfigError(f"data.mixture={mixture} with these rates selects no objective")
    return rates


def register(cfg: Config, vocab) -> str:
    """Register the tasks and mixture ``cfg.data`` describes; return the name to read from."""
    import seqio

    d, m = cfg.data, cfg.model
    length = cfg.train.seq_len
    one_d = not m.two_d_positions
    ids = inf.SpecialIds.from_model(m)
    key = hashlib.sha1(json.dumps([dataclasses.asdict(d), dataclasses.asdict(m), length, vocab.path]).encode()).hexdigest()[:10]
    feats = _output_features(m.vocab_size)
    if d.mixture == "chat":
        source, target = d.chat_lengths(length)
        name = f"glm.{key}.chat"
        _add(
            seqio.Task(
                name,
                _chat_source(d, vocab.spell),
                output_features=feats,
                preprocessors=[
                    prep.as_blocks(("prompt", "response")),
                    prep.tokenize(vocab.encode_tf, ("prompt", "response"), ("prompt", "response")),
                    prep.chat(ids, one_d=one_d, max_source=source, max_target=target,
                              count=lambda what, n: STATS.update({what: n})),
                ],
                shuffle_buffer_size=d.shuffle_buffer,
            ),
            seqio.TaskRegistry,
        )
        if not d.replay_rate:
            return name
        # Replay: the pretraining objectives of data.replay_mixture take data.replay_rate of the rows.
        replay = _pretraining_tasks(cfg, vocab, key, d.replay_mixture)
        total = sum(r for _, r in replay)
        tasks = [(name, 1.0 - d.replay_rate)] + [(n, d.replay_rate * r / total) for n, r in replay]
        mixed = f"glm.{key}.chat-replay"
        _add(seqio.Mixture(mixed, tasks), seqio.MixtureRegistry)
        return mixed
    tasks = _pretraining_tasks(cfg, vocab, key, d.mixture)
    if len(tasks) == 1:
        return tasks[0][0]
    name = f"glm.{key}.{d.mixture}"
    _add(seqio.Mixture(name, tasks), seqio.MixtureRegistry)
    return name


def _pretraining_tasks(cfg: Config, vocab, key: str, mixture: str) -> list[tuple[str, float]]:
    """Register the blank-infilling (and instruction) tasks of ``mixture``; (name, share) of each."""
    import seqio

    d, m = cfg.data, cfg.model
    length = cfg.train.seq_len
    one_d = not m.two_d_positions
    ids = inf.SpecialIds.from_model(m)
    feats = _output_features(m.vocab_size)
    rates = mixture_rates(cfg, mixture)
    sample_len = max(4, length // d.samples_per_row)
    gmin = d.gmask_min_ratio if d.gmask_min_ratio is not None else GMASK_MIN_RATIO.get(mixture, 0.2)
    # Raw chunk sizes that always fit: [MASK]/[sMASK] add 2 tokens per span (<= 0.15n + 1 spans).
    short = int((sample_len - 2) / (1 + 2 * d.mask_ratio)) - 2
    chunk_for = {"mask": short, "smask": short, "gmask": length - 2}
    tasks = []
    corpus_spec = parse_source(d.corpus, "data.corpus")
    for obj in ("mask", "smask", "gmask"):
        if obj not in rates:
            continue
        if corpus_spec.kind == "none":
            raise ConfigError(f"data.corpus=none but data.mixture={mixture} needs a corpus for {obj}")
        source = _tfds_source(corpus_spec, d.tfds_data_dir) if corpus_spec.kind == "tfds" else _text_source(corpus_spec, ("text",), d.max_document_chars, vocab.spell)
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
                _text_source(spec, ("prompt", "response"), d.max_document_chars, vocab.spell),
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
    return tasks
