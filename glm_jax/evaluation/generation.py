"""Generation tasks as GLM-130B's evaluation runs them (``GenerationTaskDataset``,
``GenerationTask`` and the LAMBADA task).

**Prompt** (``build_generation_sample``): with ``use_task_mask`` the mask is ``[gMASK]``,
else ``[MASK]``. A context that already holds the mask is blank filling: ``context
<sop>``. Otherwise ``context [MASK] <sop>``, or for a ``unidirectional`` task ``[MASK]
<sop> context`` (everything after the mask causal). The model's own position rules
place the answer (``glm_jax.model.positions``).

**Decoding**: ``sampling_strategy: BaseStrategy`` is greedy (the authors' top-k 1);
``BeamSearchStrategy`` is their deterministic beam search
(``glm_jax.inference.beam_search``) with the task's ``num_beams``, ``length_penalty``,
``no_repeat_ngram_size`` and ``min_gen_length``. Both stop at ``<eop>`` or eos, after at
most ``max_gen_length`` tokens. The authors batch a generation sample alone, padded on
the right to a multiple of 32 tokens, and their length penalty counts that padded length;
so does this one (``penalty_length``).

**LAMBADA** (a task whose ``module`` is the authors' ``tasks.lambada.task.LAMBADA``):
the beam search may not produce a punctuation token at any step, nor start with a
punctuation mark's tokens (``lambada_bans``; with GLM-130B's 150528-token vocabulary also
the authors' three hard-coded ids). The answer is the first word of the first hypothesis whose second word
is punctuation (the authors test ``words[1] in string.punctuation``, a substring test), or
else of the best one; it is right when it equals the target once both are stripped.
"""

from __future__ import annotations

import string
from typing import Callable, Optional, Sequence

from glm_jax.config import ModelConfig
from glm_jax.evaluation import metrics
from glm_jax.evaluation.samples import GenerationSample
from glm_jax.evaluation.task_config import TaskConfig, TaskError
from glm_jax.inference.text import until_stop

LAMBADA_MODULE = "tasks.lambada.task.LAMBADA"
GLM_130B_VOCAB = 150528
GLM_130B_LAMBADA_BANNED = (20068, 146010, 146337)  # the authors' invalid_slices for GLM-130B's vocabulary
GLM_130B_LAMBADA_PREFIXES = ((46010,), (146337,))  # "'" and "``" in GLM-130B's vocabulary
TILE = 32


def is_lambada(task: TaskConfig) -> bool:
    return task.module == LAMBADA_MODULE


def prompt(sample: GenerationSample, cfg: ModelConfig, task: TaskConfig, where: str = "") -> list[int]:
    mask = cfg.gmask_token_id if task.use_task_mask else cfg.mask_token_id
    context = list(sample.context)
    if mask in context:
        if task.unidirectional or task.use_task_mask:
            raise TaskError(f"{where or task.source}: a context holding the mask is blank filling, which needs "
                            "use_task_mask: false and unidirectional: false")
        return context + [cfg.sop_token_id]
    if task.unidirectional:
        return [mask, cfg.sop_token_id] + context
    return context + [mask, cfg.sop_token_id]


def penalty_length(prompt_ids: Sequence[int]) -> int:
    """The context length the authors' length penalty counts: the prompt padded to 32."""
    return -(-len(prompt_ids) // TILE) * TILE


def lambada_bans(cfg: ModelConfig, encode: Callable[[str], Sequence[int]]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(banned tokens, banned prefixes) of the LAMBADA task for this vocabulary.

    Each punctuation mark is tokenized as the authors do (``encode(mark)``) and also as it
    follows a word (``encode("a" + mark)`` less ``encode("a")``): a SentencePiece vocabulary
    spells a mark at the start of a text with its word-boundary piece and after a word
    without it, and a model generates the bare form; both are banned."""
    banned = list(GLM_130B_LAMBADA_BANNED) if cfg.vocab_size == GLM_130B_VOCAB else []
    prefixes = list(GLM_130B_LAMBADA_PREFIXES) if cfg.vocab_size == GLM_130B_VOCAB else []
    word = tuple(int(t) for t in encode("a"))
    for mark in string.punctuation:
        forms = [tuple(int(t) for t in encode(mark))]
        joined = tuple(int(t) for t in encode("a" + mark))
        if joined[: len(word)] == word and len(joined) > len(word):
            forms.append(joined[len(word):])
        for ids in forms:
            if len(ids) == 1:
                banned.append(ids[0])
            if ids:
                prefixes.append(ids)
    return tuple(dict.fromkeys(banned)), tuple(dict.fromkeys(prefixes))


def first_word(ids: Sequence[int], encode, decode) -> list[int]:
    """The authors' ``get_first_word_tokens``: the first space-separated word, re-tokenized."""
    return list(encode(decode(ids).strip().split(" ")[0]))


def lambada_answer(hypotheses: Sequence[Sequence[int]], encode, decode) -> list[int]:
    for ids in hypotheses:
        words = decode(ids).strip().split(" ")
        if len(words) >= 2 and words[1] in string.punctuation:
            return first_word(ids, encode, decode)
    return first_word(hypotheses[0], encode, decode)


class Decoder:
    """Each sample's hypotheses (best first) for one generation task, batched."""

    def __init__(self, generator, task: TaskConfig, encode, *, batch_rows: int = 8,
                 progress: Optional[Callable[[int], None]] = None):
        from glm_jax.inference.beam_search import BeamSearch  # imports jax: after the inputs are checked

        self.generator, self.task, self.progress = generator, task, progress or (lambda n: None)
        cfg = generator.cfg
        self.beams = None
        if task.sampling_strategy == "BeamSearchStrategy":
            banned, prefixes = lambada_bans(cfg, encode) if is_lambada(task) else ((), ())
            self.beams = BeamSearch(num_beams=task.num_beams, length_penalty=task.length_penalty,
                                    no_repeat_ngram_size=task.no_repeat_ngram_size, min_gen_length=task.min_gen_length,
                                    banned_tokens=banned, banned_prefixes=prefixes).validate(cfg.vocab_size)
        self.per_call = max(1, batch_rows // (self.beams.num_beams if self.beams else 1))

    def __call__(self, prompts: Sequence[list[int]]) -> list[list[list[int]]]:
        out: list[list[list[int]]] = []
        n_new = self.task.max_gen_length
        stops = set(self.generator.stop_tokens)
        for i in range(0, len(prompts), self.per_call):
            part = list(prompts[i: i + self.per_call])
            full = part + [part[-1]] * (self.per_call - len(part))  # a fixed batch: one program per length
            if self.beams is None:
                rows = self.generator.generate(full, n_new, bucket=TILE)[:, -n_new:]
                out.extend([until_stop(row, stops)] for row in rows[: len(part)])
            else:
                hyps = self.generator.beam_search(full, n_new, self.beams, bucket=TILE,
                                                  context_lengths=[penalty_length(p) for p in full])
                out.extend([[list(h.tokens) for h in hs] for hs in hyps[: len(part)]])
            self.progress(len(part))
        return out


def score(task: TaskConfig, hypotheses: Sequence[Sequence[Sequence[int]]], samples: Sequence[GenerationSample],
          encode, decode) -> tuple[dict, list[str]]:
    """The task's metrics (percent) and each sample's predicted text."""
    if is_lambada(task):
        predictions = [decode(lambada_answer(h, encode, decode)) for h in hypotheses]
    else:
        predictions = [decode(h[0]) for h in hypotheses]
    targets = [[decode(t) for t in s.targets] for s in samples]
    names = task.metrics or (("Accuracy",) if is_lambada(task) else ("EM", "F1"))
    table = {"EM": metrics.exact_match, "F1": metrics.f1,
             "Accuracy": metrics.stripped_match if is_lambada(task) else metrics.exact_match}
    return {name: metrics.best_over_targets(table[name], predictions, targets) for name in names}, predictions

