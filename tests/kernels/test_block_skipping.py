"""Block skipping is real: the blocks each kernel computes are exactly the non-empty blocks
of the dense mask (counted inside the kernels), a skipped grid step fetches no new block,
and the per-block classification from one integer per token matches the dense mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import KINDS, mask_inputs, nonempty_blocks
from glm_jax.kernels import block_mask, flash_tpu
from glm_jax.kernels import flash_attention as fa
from glm_jax.kernels import attention_mask


def _glm_batch():
    """Row 0: one [gMASK] sequence with a 37-token Part A; row 1: three packed samples
    (Part A 10 of 30, 0 of 45, all 20 of 20) and 5 padding tokens."""
    n = 100
    seg = np.array([[1] * n, [1] * 30 + [2] * 45 + [3] * 20 + [0] * 5], np.int32)
    plen = np.array([[37, 0, 0], [10, 0, 20]], np.int32)
    return attention_mask.part_a_end(jnp.asarray(plen), jnp.asarray(seg), n), jnp.asarray(seg)


@pytest.mark.parametrize("lowering", ["mosaic", "triton"])
def test_kernels_compute_exactly_the_nonempty_blocks(lowering):
    part_a_end, seg = _glm_batch()
    b, n, h, d = 2, 100, 2, 16
    q = jax.random.normal(jax.random.key(0), (b, n, h, d))
    blocks = fa.BlockSizes(16, 16, 32, 16)
    got = fa.visit_counts(q, q, q, part_a_end, seg, block_sizes=blocks, lowering=lowering)
    padded = got["static"].padded
    fwd = nonempty_blocks(part_a_end, seg, 16, 16, padded)  # [b, q blocks, kv blocks]
    bwd = nonempty_blocks(part_a_end, seg, 32, 16, padded)
    for name, counts, want in (("fwd", got["fwd"], fwd.sum(2)), ("dq", got["dq"], bwd.sum(2)), ("dkv", got["dkv"], bwd.sum(1))):
        counts = np.asarray(counts)
        assert counts.shape[:2] == (b, h), name
        np.testing.assert_array_equal(counts, np.broadcast_to(want[:, None, :], counts.shape), err_msg=name)
    # The mask is sparse enough that skipping matters: well under all of the blocks.
    assert fwd.sum() < 0.65 * fwd.size


def test_skipped_grid_steps_fetch_no_block():
    """The TPU index maps send step t of a query block to block lo + t while it is visited and
    then repeat the last visited block, so the pipeline fetches each visited block once and
    nothing else: the fetched blocks are exactly the non-empty ones."""
    part_a_end, seg = _glm_batch()
    bq = bk = 16
    padded = 112
    ranges = np.asarray(block_mask.q_block_ranges(block_mask.token_mask(part_a_end, seg, padded), bq, bk))
    flat = ranges.reshape(-1)
    nq = nk = padded // bq
    want = nonempty_blocks(part_a_end, seg, bq, bk, padded)
    for b in range(2):
        for i in range(nq):
            steps = [int(flash_tpu.visited_block(flat, b, i, j, nq)) for j in range(nk)]
            fetched = [blk for t, blk in enumerate(steps) if t == 0 or blk != steps[t - 1]]
            assert sorted(fetched) == list(np.flatnonzero(want[b, i])), (b, i, steps)


def test_block_ranges_match_the_dense_mask():
    """Visited and fully visible blocks from one integer per token equal the dense mask's
    non-empty and full blocks (both directions); repeated segment ids stay safe."""
    rng = np.random.default_rng(0)
    for n, bq, bk in ((45, 8, 16), (64, 16, 8), (31, 32, 8)):
        padded = -(-n // max(bq, bk)) * max(bq, bk)

        @jax.jit
        def classes(part_a_end, seg):
            tm = block_mask.token_mask(part_a_end, seg, padded)
            q_ranges, kv_ranges = block_mask.q_block_ranges(tm, bq, bk), block_mask.kv_block_ranges(tm, bq, bk)
            by_q = block_mask.classes(q_ranges, padded // bk)
            by_kv = block_mask.classes(kv_ranges, padded // bq)
            dense = block_mask.dense_classes(part_a_end, seg, bq, bk, padded)
            in_bounds = (q_ranges[..., 1] <= padded // bk).all() & (kv_ranges[..., 1] <= padded // bq).all()
            return by_q, jnp.swapaxes(by_kv, 1, 2), dense, in_bounds

        for trial in range(6):
            for kind in KINDS:
                by_q, by_kv, dense, in_bounds = map(np.asarray, classes(*mask_inputs(rng, 3, n, kind)))
                assert in_bounds, kind  # a kernel never walks past the last block
                for got in (by_q, by_kv):
                    if kind == "repeated_ids":  # visit a superset of the non-empty blocks, call full only full ones
                        assert not ((dense != block_mask.EMPTY) & (got == block_mask.EMPTY)).any()
                        assert not ((got == block_mask.FULL) & (dense != block_mask.FULL)).any()
                    else:
                        np.testing.assert_array_equal(got, dense, err_msg=f"{kind} n={n} bq={bq} bk={bk}")
