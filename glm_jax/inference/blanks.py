"""GLM-130B's blank filling: several blanks filled one at a time, left to right (MODEL.md §1.6).

For each row the generation mask is ``[MASK]`` if the row has one, else ``[sMASK]``, else
``[gMASK]``. Each round takes the first remaining blank of that kind, generates after
``row <sop>`` (the position rules point every new token at that blank), and writes the
answer into the row in the blank's place; the next round sees the earlier answers as
ordinary text. Rows whose blanks are all filled drop out of the batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from glm_jax.inference.decode import PromptError
from glm_jax.inference.sampling import Sampling


def generation_mask(row: Sequence[int], cfg) -> int:
    for token in (cfg.mask_token_id, cfg.smask_token_id):
        if token in row:
            return token
    return cfg.gmask_token_id


def fill_blanks(generator, rows: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(), *, bucket: int = 16):
    """Fill every blank of each row (ids without ``<sop>``). Rows grow by their answers each
    round; ``bucket`` pads the prompt length up so that rounds share a compiled program.

    Returns ``(filled, answers)``: each row with its blanks replaced by the generated
    text, and per row the list of answers (token ids, stop token excluded) in order.
    """
    cfg = generator.cfg
    rows = [list(map(int, r)) for r in rows]
    masks = [generation_mask(r, cfg) for r in rows]
    for i, (r, m) in enumerate(zip(rows, masks)):
        if m not in r:
            raise PromptError(
                f"row {i} has no [MASK] (id {cfg.mask_token_id}), [sMASK] ({cfg.smask_token_id}) or [gMASK] "
                f"({cfg.gmask_token_id}) to fill"
            )
    answers: list[list[list[int]]] = [[] for _ in rows]
    stops = set(generator.stop_tokens)
    while True:
        active = [i for i, (r, m) in enumerate(zip(rows, masks)) if m in r]
        if not active:
            return rows, answers
        prompts = [rows[i] + [cfg.sop_token_id] for i in active]
        new = generator.generate(prompts, max_new_tokens, sampling, bucket=bucket)[:, -max_new_tokens:]
        for i, out in zip(active, np.asarray(new).tolist()):
            end = next((j for j, t in enumerate(out) if t in stops), len(out))
            answer = out[:end]
            at = rows[i].index(masks[i])
            rows[i] = rows[i][:at] + answer + rows[i][at + 1 :]
            answers[i].append(answer)
