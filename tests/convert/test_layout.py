"""glm_jax.checkpoint.authors_layout is the one parameter mapping: it must agree with the mapping
the numerical reference (tests/reference_glm.py) uses, invert exactly, describe the
model's real parameter tree, and give the same result streamed in blocks as whole."""

import dataclasses
import functools

import numpy as np
import pytest

from glm_jax.convert import blocks as blk
from glm_jax.checkpoint import authors_layout
from glm_jax.model import parameters
from helpers import variant
from reference_glm import authors_state_dict

VARIANTS = ["glm-130b", "chatglm-6b", "glm-original"]


@functools.lru_cache(maxsize=None)
def _params(name, scan):
    """Random parameters in the tree authors_layout.leaf_shapes describes (which
    test_leaf_shapes_match_the_model ties to the model itself)."""
    cfg = variant(name, scan_layers=scan)
    rng = np.random.default_rng(0)
    tree = {}
    for path, shape in authors_layout.leaf_shapes(cfg).items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = rng.standard_normal(shape).astype(np.float32)
    return cfg, tree


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, prefix + (k,)))
        return out
    return {prefix: np.asarray(tree)}


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_to_authors_equals_reference_mapping(name, scan):
    cfg, params = _params(name, scan)
    want = authors_state_dict(params, cfg)
    got = authors_layout.to_authors(params, cfg)
    assert set(got) == set(want)  # (ours lists keys in the authors' state-dict order)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_from_authors_inverts_to_authors(name, scan):
    cfg, params = _params(name, scan)
    back = _flat(authors_layout.from_authors(authors_layout.to_authors(params, cfg), cfg))
    want = _flat(params)
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=str(k))


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_leaf_shapes_match_the_model(name, scan):
    """The converters' numpy-only layout and the model's own parameters agree on every leaf."""
    cfg = variant(name, scan_layers=scan)
    assert authors_layout.leaf_shapes(cfg) == parameters.leaf_shapes(cfg)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("block_bytes", [1, 700, 5000, 1 << 30])
def test_blocks_reassemble_whole_tensors(name, block_bytes):
    cfg = dataclasses.replace(variant(name), num_layers=1)
    rng = np.random.default_rng(0)
    seen = set()
    for e in authors_layout.entries(cfg):
        t = e.transform
        if (t.split, t.perm) in seen:
            continue
        seen.add((t.split, t.perm))
        src = rng.standard_normal(t.authors_shape).astype(np.float32)
        units = blk.block_units(t, 4, block_bytes)
        chunk = blk.chunk_shape(t, units)
        ours = np.full(t.ours_shape, np.nan, np.float32)
        rows = 0
        for b in blk.blocks(t, units):
            box = blk.rows_to_ours(t, b, src[b.row_start:b.row_stop])
            assert all(s <= c for s, c in zip(box.shape, chunk, strict=True))  # a block never spans two chunks
            assert np.isnan(ours[b.region]).all()  # and no two blocks overlap
            ours[b.region] = box
            np.testing.assert_array_equal(blk.ours_to_rows(t, b, ours[b.region]), src[b.row_start:b.row_stop])
            rows += b.row_stop - b.row_start
        assert rows == t.authors_shape[0]
        np.testing.assert_array_equal(ours, t.to_ours(src), err_msg=e.key)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 6, 1, 4), (4, 1, 3), (5, 7), (3,)])
def test_permuted_equals_torch_permute(shape):
    """blocks.permuted (the fast copy every block goes through) is exactly permute + contiguous."""
    import itertools

    import torch

    x = torch.arange(int(np.prod(shape)), dtype=torch.int32).reshape(shape)
    for perm in itertools.permutations(range(len(shape))):
        got = blk.permuted(x, perm)
        assert got.is_contiguous() and torch.equal(got, x.permute(perm))
