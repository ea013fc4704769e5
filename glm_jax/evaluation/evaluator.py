"""One model evaluating data files of any task type: read a file, evaluate it, return its
record (metrics, predictions, counts). ``runner.run_task`` drives it file by file.

* ``mul``: each sample's packed row scored (``multiple_choice.py``), the best choice
  predicted, accuracy.
* ``gen``: each sample's prompt decoded greedily or by beam search (``generation.py``),
  exact match and F1 against its targets (LAMBADA: its own rule).
* ``lm``: the document's windows scored (``language_model.py``), perplexity.

A task's ``max_seq_length`` is capped at the model's ``max_seq_len`` (the authors' tasks
say 2048; a smaller model cuts contexts to what it can take, and the runner says so).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from glm_jax.config import ModelConfig
from glm_jax.evaluation import generation, language_model, metrics, multiple_choice, samples
from glm_jax.evaluation.task_config import TaskConfig

Progress = Callable[[int], None]


class Evaluator:
    def __init__(self, cfg: ModelConfig, params: Any, encode: Callable[[str], Sequence[int]],
                 decode: Callable[[Sequence[int]], str], *, batch_rows: int = 8, generator=None, mesh=None):
        from glm_jax.evaluation.scoring import Scorer  # imports jax: the CLI checks its inputs first

        self.cfg, self.params, self.encode, self.decode = cfg, params, encode, decode
        self.scorer = Scorer(cfg, params, batch_rows=batch_rows, mesh=mesh)
        self.batch_rows = self.scorer.batch_rows
        self._generator = generator

    @property
    def generator(self):
        if self._generator is None:
            from glm_jax.inference.decode import Generator

            self._generator = Generator(self.cfg, self.params)
        return self._generator

    def max_seq_length(self, task: TaskConfig) -> int:
        return min(task.max_seq_length, self.cfg.max_seq_len)

    def read(self, task: TaskConfig, path: str, counts: dict):
        """The file's items, every line checked (the first problem is a ``TaskError``)."""
        n = self.max_seq_length(task)
        if task.type == "mul":
            return samples.read_choice_file(path, self.encode, n, counts)
        if task.type == "gen":
            items = samples.read_generation_file(path, self.encode, n, task.max_gen_length, counts)
            for i, s in enumerate(items):
                generation.prompt(s, self.cfg, task, where=f"{path} (sample {i + 1})")
            return items
        return samples.read_document(path, self.encode)

    def size(self, task: TaskConfig, items) -> int:
        """How many samples a file counts (a document: its windows, as the authors count)."""
        if task.type == "lm":
            return language_model.window_count(len(items.tokens), self.max_seq_length(task), task.generation_length)
        return len(items)

    def evaluate(self, task: TaskConfig, items, progress: Optional[Progress] = None) -> dict:
        progress = progress or (lambda n: None)
        return getattr(self, "_" + task.type)(task, items, progress)

    def _scored(self, rows, progress: Progress) -> list[list[float]]:
        out = []
        for i in range(0, len(rows), self.batch_rows):
            out.extend(self.scorer.row_scores(rows[i: i + self.batch_rows]))
            progress(min(self.batch_rows, len(rows) - i))
        return out

    def _mul(self, task: TaskConfig, items, progress: Progress) -> dict:
        rows = [multiple_choice.packed_row(s, self.cfg, task.use_task_mask) for s in items]
        choice_scores = self._scored(rows, progress)
        predictions = [int(np.argmax(s)) for s in choice_scores]
        labels = [s.label for s in items]
        return {"samples": len(items), "metrics": {"Accuracy": metrics.accuracy(predictions, labels)},
                "predictions": predictions, "labels": labels, "scores": choice_scores}

    def _gen(self, task: TaskConfig, items, progress: Progress) -> dict:
        decoder = generation.Decoder(self.generator, task, self.encode, batch_rows=self.batch_rows, progress=progress)
        hypotheses = decoder([generation.prompt(s, self.cfg, task) for s in items])
        values, predictions = generation.score(task, hypotheses, items, self.encode, self.decode)
        return {"samples": len(items), "metrics": values, "predictions": predictions,
                "hypotheses": hypotheses}

    def _lm(self, task: TaskConfig, doc, progress: Progress) -> dict:
        rows = language_model.window_rows(doc, self.cfg, max_seq_length=self.max_seq_length(task),
                                          generation_length=task.generation_length,
                                          use_task_mask=task.use_task_mask, unidirectional=task.unidirectional)
        loss = -sum(s[0] for s in self._scored(rows, progress))
        return {"samples": len(rows), "metrics": {"PPL": metrics.perplexity(loss, doc.words)}, "loss": loss,
                "tokens": len(doc.tokens), "words": doc.words}
