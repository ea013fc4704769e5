"""glm_jax as a model of EleutherAI's lm-evaluation-harness (the ``lm-eval`` package),
registered as ``glm_jax``::

    python -m glm_jax.harness --model glm_jax --model_args checkpoint=DIR,quantize=int4 --tasks ...

(``python -m glm_jax.harness`` is lm-eval's own command line with this model registered:
lm-eval 0.4 finds models only in its own registry, so the bare ``lm_eval`` command cannot
see a model defined outside it. From Python, ``import glm_jax.evaluation.harness`` and
pass ``model="glm_jax"`` to ``lm_eval.simple_evaluate``.)

Model arguments: ``checkpoint`` (required), ``quantize`` (int8|int4), ``dtype``, ``vocab``,
``vocab_id_offset``, ``ptuning_checkpoint``, ``lora_adapter``, ``model_parallel`` (as
``python -m glm_jax.generate`` takes them), ``mask`` (``MASK`` or ``gMASK``: the mask before a scored
continuation; default ``gMASK`` for 2D-position models such as ChatGLM-6B, ``MASK`` for
GLM-130B as its authors' multiple-choice tasks use), ``max_gen_toks`` (default 256),
``rolling_stride`` (default half the model's length). lm-eval's ``--batch_size`` is the rows
per forward pass.

The three requests, in GLM's own layout:

* ``loglikelihood(context, continuation)``: the row ``context [MASK] <sop>
  continuation[:-1]`` with the context and the mask as Part A (bidirectional) and the
  continuation causal: the continuation's summed log-probability and whether greedy
  decoding gives it (``glm_jax.evaluation.multiple_choice``'s row for one choice). A context
  too long for the model is cut from the left.
* ``loglikelihood_rolling(text)``: the text's summed log-probability over rolling windows of
  the model's length, each token scored once (``glm_jax.evaluation.language_model``; the
  first token is predicted from ``[MASK] <sop>``).
* ``generate_until(context, {until, max_gen_toks, do_sample, temperature, ...})``: the
  prompt ``context [gMASK] <sop>`` continued by the KV-cache generator, greedy unless
  ``do_sample``, cut at the first ``until`` string.

Nothing is downloaded: a task's data must be on the machine (README, "Evaluation").
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from glm_jax.convert import lora_adapter as adapter_files, ptuning
from glm_jax.evaluation import language_model, multiple_choice
from glm_jax.evaluation.samples import ChoiceSample, Document
from glm_jax.inference import cli
from glm_jax.inference.sampling import Sampling
from glm_jax.inference.text import until_stop

MASKS = ("MASK", "gMASK")


@register_model("glm_jax")
class GLMJaxLM(LM):
    def __init__(self, checkpoint: Optional[str] = None, quantize: Optional[str] = None, dtype: Optional[str] = None,
                 vocab: Optional[str] = None, vocab_id_offset: Optional[int] = None,
                 ptuning_checkpoint: Optional[str] = None, lora_adapter: Optional[str] = None,
                 mask: Optional[str] = None, max_gen_toks: int = 256, rolling_stride: Optional[int] = None,
                 model_parallel: int = 1, batch_size=8, max_batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"glm_jax model: unknown argument {sorted(unknown)[0]!r}; valid: checkpoint, quantize, "
                             "dtype, vocab, vocab_id_offset, ptuning_checkpoint, lora_adapter, mask, max_gen_toks, "
                             "rolling_stride, model_parallel")
        if not checkpoint:
            raise ValueError("glm_jax model: --model_args checkpoint=DIR is required")
        if mask is not None and mask not in MASKS:
            raise ValueError(f"glm_jax model: mask={mask!r}; valid: {', '.join(MASKS)}")
        args = argparse.Namespace(checkpoint=str(checkpoint), quantize=quantize, dtype=dtype, vocab=vocab,
                                  vocab_id_offset=vocab_id_offset, ptuning_checkpoint=ptuning_checkpoint,
                                  lora_adapter=lora_adapter, model_parallel=int(model_parallel))
        self.model, self.text = cli.load_model_and_text(args, read_prefix=ptuning.read, read_adapter=adapter_files.read)
        cfg = self.cfg = self.model.config
        self.use_gmask = (mask or ("gMASK" if cfg.two_d_positions else "MASK")) == "gMASK"
        self.batch_rows = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not measured: 8
        self.max_gen_toks = int(max_gen_toks)
        self.stride = int(rolling_stride) if rolling_stride else max(1, cfg.max_seq_len // 2)
        if not 0 < self.stride < cfg.max_seq_len - 1:
            raise ValueError(f"glm_jax model: rolling_stride={self.stride}; expected 1 .. {cfg.max_seq_len - 2}")
        from glm_jax.evaluation.scoring import Scorer  # imports jax: once the arguments are checked

        self.scorer = Scorer(cfg, self.model.params, batch_rows=self.batch_rows, mesh=self.model.mesh)

    # -- loglikelihood ---------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for r in requests:
            context, continuation = r.args
            cont = tuple(self.text.encode(continuation))
            if not cont:
                raise ValueError(f"glm_jax model: an empty continuation after {context[-40:]!r}")
            ctx = tuple(self.text.encode(context))
            room = self.cfg.max_seq_len - len(cont) - 1  # the mask and <sop> take two; <sop> replaces the last token
            if room < 1:
                raise ValueError(f"glm_jax model: a continuation of {len(cont)} tokens does not fit the model's "
                                 f"{self.cfg.max_seq_len}")
            ctx = ctx[max(0, len(ctx) - room + 1):]
            sample = ChoiceSample(ctx, (cont,), 0)
            rows.append(multiple_choice.alone_rows(sample, self.cfg, self.use_gmask)[0])
        out = [tuple(s[0]) for s in self._score(rows, greedy=True)]
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            (text,) = r.args
            tokens = tuple(self.text.encode(text))
            if not tokens:
                out.append(0.0)
                continue
            rows = language_model.window_rows(Document(tokens, 1), self.cfg, max_seq_length=self.cfg.max_seq_len,
                                              generation_length=self.stride, use_task_mask=self.use_gmask,
                                              unidirectional=False)
            out.append(float(sum(s[0] for s in self._score(rows))))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def _score(self, rows, greedy: bool = False):
        return self.scorer.row_scores(rows, greedy=greedy)

    # -- generate_until ----------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Requests with the same settings are generated ``batch_size`` prompts at a time."""
        cfg = self.cfg
        groups: dict = {}
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            n = max(1, min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), cfg.max_seq_len - 3))
            sampling = Sampling()
            if kwargs.pop("do_sample", False):
                sampling = Sampling(greedy=False, temperature=float(kwargs.pop("temperature", 1.0) or 1.0),
                                    top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                    seed=int(kwargs.pop("seed", 0) or 0)).validate()
            ctx = list(self.text.encode(context))
            room = cfg.max_seq_len - n - 2
            prompt = ctx[max(0, len(ctx) - room):] + [cfg.gmask_token_id, cfg.sop_token_id]
            groups.setdefault((until, n, sampling), []).append((i, prompt))
        out: list = [None] * len(requests)
        stops = self.model.generator.stop_tokens
        for (until, n, sampling), items in groups.items():
            for at in range(0, len(items), self.batch_rows):
                part = items[at: at + self.batch_rows]
                rows = self.model.generate([p for _, p in part], n, sampling, bucket=32)[:, -n:]
                for (i, _), ids in zip(part, rows):
                    answer = self.text.decode(until_stop(ids, stops))
                    cut = [answer.find(u) for u in until if u and u in answer]
                    out[i] = answer[: min(cut)] if cut else answer
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's command line with the ``glm_jax`` model registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()

