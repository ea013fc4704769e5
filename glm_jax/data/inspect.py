"""``python -m glm_jax.data.inspect [--config PATH] [--mixture NAME] [--n 3] [key=value ...]``

Prints decoded training rows with GLM's structure marked: each segment's Part A (what
the model reads bidirectionally), its Part B spans (``<sop>`` ... with the positions and
block positions each token gets), and the loss weights. What to reach for when
debugging data.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Optional, Sequence

import numpy as np

from glm_jax import cli
from glm_jax.data import tasks
from glm_jax.data.pipeline import batches
from glm_jax.data.vocab import load_vocabulary
from glm_jax.model.batch import Batch


def describe_row(row: Batch, vocab, two_d: bool) -> list[str]:
    """One row of a batch (``Batch.row``) as text: Part A, each Part B span, padding."""
    tokens, weights = row.tokens, row.loss_weights
    pos = row.positions[0] if two_d else row.positions
    blk = row.positions[1] if two_d else None
    seg = row.segment_ids
    seg = seg if seg is not None else np.where(np.arange(len(tokens)) < len(tokens), 1, 0)
    lines = []
    segments = [s for s in dict.fromkeys(seg.tolist()) if s != 0]
    for s in segments:
        idx = np.flatnonzero(seg == s)
        n_a = int(row.prefix_len[s - 1]) if np.ndim(row.prefix_len) else int(row.prefix_len)
        if row.segment_ids is None:
            idx = idx[: n_a + int((weights > 0).sum())]
        a, b = idx[:n_a], idx[n_a:]
        lines.append(f"  segment {s}: Part A {len(a)} tokens, Part B {len(b)} tokens (loss on {int(weights[b].sum())})")
        lines.append("    A │ " + vocab.decode(tokens[a]).replace("\n", "⏎"))
        starts = [i for i in b if (blk[i] == 1 if two_d else tokens[i] == vocab.cfg.sop_token_id)]
        for j, st in enumerate(starts):
            en = starts[j + 1] if j + 1 < len(starts) else (b[-1] + 1)
            span = np.arange(st, en)
            body = vocab.decode(tokens[span[1:]]).replace("\n", "⏎")
            where = f"pos {int(pos[st])}" + (f", block 1..{int(blk[span[-1]])}" if two_d else "")
            lines.append(f"    B │ <sop>{body}  [{where}; targets end <eop>]")
    pad = int((seg == 0).sum()) if row.segment_ids is not None else len(tokens) - len(idx)
    lines.append(f"  padding: {pad} of {len(tokens)} tokens")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.data.inspect", description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--mixture", default=None, help="data.mixture to show (default: the config's)")
    parser.add_argument("--n", type=int, default=3, help="rows to show")
    parser.add_argument("--split", default="train", choices=["train", "validation"])
    args = parser.parse_args(argv)
    if args.mixture:
        args.overrides = list(args.overrides) + [f"data.mixture={args.mixture}"]
    cfg = cli.config_from_args(args)
    if cfg.data.mixture == "synthetic":
        raise cli.ConfigError("inspect shows seqio mixtures; data.mixture=synthetic has no text")

    vocab = load_vocabulary(cfg.model, cfg.data.vocab, cfg.data.vocab_id_offset)
    two_d = cfg.model.two_d_positions
    gen = batches(cfg, args.split)
    shown = 0
    print(f"mixture {cfg.data.mixture} on {cfg.data.corpus}; rates {tasks.mixture_rates(cfg)}; seq_len {cfg.train.seq_len}, pack {cfg.data.pack}")
    for batch in itertools.islice(gen, (args.n + cfg.train.batch_size - 1) // cfg.train.batch_size):
        for r in range(batch.size):
            if shown == args.n:
                break
            row = batch.row(r)
            print(f"row {shown}:")
            print("\n".join(describe_row(row, vocab, two_d)))
            shown += 1
    gen.close()
    if tasks.STATS:
        print(f"reader: {dict(tasks.STATS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
