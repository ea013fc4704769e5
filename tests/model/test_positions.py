"""Mask and position helpers against the worked examples of MODEL.md §1.6 and §2.3."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from glm_jax.kernels import attention_mask
from glm_jax.model import positions
from helpers import variant

C130 = variant("glm-130b")
CHAT = variant("chatglm-6b")


def _authors_visibility(length, context_length):
    """ones -> tril -> columns [:context_length] = 1; True = may attend."""
    m = np.tril(np.ones((length, length), bool))
    m[:, :context_length] = True
    return m


def _ours(tokens, cfg):
    inp = positions.prepare_inputs(np.asarray([tokens]), cfg)
    end = attention_mask.part_a_end(inp["prefix_len"], inp["segment_ids"], len(tokens))
    vis = np.asarray(attention_mask.dense_visibility(end, None if inp["segment_ids"] is None else jnp.asarray(inp["segment_ids"])))
    return inp, vis[0]


def test_chatglm_worked_example_2d():
    # §2.3: [t0 .. t_{n-1}, [gMASK](n), <sop>(n+1)] then generated g1, g2, g3.
    n = 4
    row = [11, 12, 13, 14, CHAT.gmask_token_id, CHAT.sop_token_id, 21, 22, 23]
    inp, vis = _ours(row, CHAT)
    np.testing.assert_array_equal(inp["positions"][0, 0], [0, 1, 2, 3, 4, 4, 4, 4, 4])  # 0..n, then n
    np.testing.assert_array_equal(inp["positions"][0, 1], [0, 0, 0, 0, 0, 1, 2, 3, 4])  # <sop> has block 1
    assert inp["prefix_len"][0] == n + 1  # context_length = index of <sop>
    np.testing.assert_array_equal(vis, _authors_visibility(len(row), n + 1))


def test_chatglm_uses_mask_position_when_no_gmask():
    row = [11, CHAT.mask_token_id, 12, 13, CHAT.sop_token_id, 21, 22]
    inp, _ = _ours(row, CHAT)
    np.testing.assert_array_equal(inp["positions"][0, 0], [0, 1, 2, 3, 1, 1, 1])
    np.testing.assert_array_equal(inp["positions"][0, 1], [0, 0, 0, 0, 1, 2, 3])


def test_glm130b_gmask_positions_are_arange():
    # §1.6: [gMASK] -> plain arange over the whole sequence, generated tokens included.
    row = [11, 12, 13, C130.gmask_token_id, C130.sop_token_id, 21, 22]
    inp, vis = _ours(row, C130)
    np.testing.assert_array_equal(inp["positions"][0], np.arange(7))
    assert inp["prefix_len"][0] == 4
    np.testing.assert_array_equal(vis, _authors_visibility(7, 4))  # columns [0, C-1) visible


def test_glm130b_mask_positions_point_at_the_mask():
    # §1.6: [MASK] -> arange on Part A; <sop> and everything after take the [MASK] index.
    row = [11, C130.mask_token_id, 12, 13, C130.eos_token_id, C130.sop_token_id, 21, 22]
    inp, vis = _ours(row, C130)
    np.testing.assert_array_equal(inp["positions"][0], [0, 1, 2, 3, 4, 1, 1, 1])
    np.testing.assert_array_equal(vis, _authors_visibility(8, 5))


def test_glm130b_mask_wins_over_gmask_and_smask_wins_over_gmask():
    row = [11, C130.gmask_token_id, 12, C130.mask_token_id, C130.sop_token_id, 21]
    np.testing.assert_array_equal(_ours(row, C130)[0]["positions"][0], [0, 1, 2, 3, 3, 3])
    row = [11, C130.smask_token_id, 12, C130.sop_token_id, 21]
    np.testing.assert_array_equal(_ours(row, C130)[0]["positions"][0], [0, 1, 2, 1, 1])


def test_no_sop_means_all_part_a():
    row = [11, 12, C130.gmask_token_id]
    inp, vis = _ours(row, C130)
    assert inp["prefix_len"][0] == 3 and vis.all()


def test_left_padding_is_its_own_segment():
    row = [CHAT.pad_token_id] * 2 + [11, 12, CHAT.gmask_token_id, CHAT.sop_token_id, 21]
    inp, vis = _ours(row, CHAT)
    np.testing.assert_array_equal(inp["segment_ids"][0], [0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(inp["positions"][0, 0], [0, 0, 0, 1, 2, 2, 2])  # as if unpadded
    np.testing.assert_array_equal(inp["positions"][0, 1], [0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(vis[2:, 2:], _authors_visibility(5, 3))
    assert not vis[2:, :2].any()  # real tokens never see padding


def test_part_a_end_for_packed_segments():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    plen = jnp.asarray([[2, 3]])
    np.testing.assert_array_equal(attention_mask.part_a_end(plen, seg, 8)[0], [2, 2, 2, 6, 6, 6, 6, 7])
    vis = np.asarray(attention_mask.dense_visibility(attention_mask.part_a_end(plen, seg, 8), seg))[0]
    np.testing.assert_array_equal(vis[:3, :3], _authors_visibility(3, 2))
    np.testing.assert_array_equal(vis[3:7, 3:7], _authors_visibility(4, 3))
    assert not vis[:3, 3:].any() and not vis[3:7, :3].any()


def test_special_ids_come_from_the_config():
    cfg = dataclasses.replace(C130, gmask_token_id=50, sop_token_id=51)
    inp, _ = _ours([11, 50, 51, 21], cfg)
    assert inp["prefix_len"][0] == 2
