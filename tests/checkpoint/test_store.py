"""Checkpoints written chunk by chunk through tensorstore restore with orbax itself."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from glm_jax.checkpoint import store


def _write(path, leaves):
    w = store.CheckpointWriter(str(path))
    for key, (value, chunks) in leaves.items():
        arr = w.create(key, value.shape, value.dtype, chunks)
        for i in range(0, value.shape[0], chunks[0]):
            w.write(arr, (slice(i, i + chunks[0]),), value[i:i + chunks[0]])
    w.finish()


def test_written_checkpoint_restores_with_standard_checkpointer(tmp_path):
    rng = np.random.default_rng(0)
    leaves = {
        ("word_embeddings",): (rng.standard_normal((6, 4)).astype(np.float16), (2, 4)),
        ("layers", "block", "w"): (rng.standard_normal((3, 5, 2)).astype(np.float32), (1, 5, 2)),
        ("layers", "block", "b"): (np.zeros((3, 2), np.float32), (1, 2)),  # all-zero chunks are stored too
        ("lm_head",): (rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16), (4, 3)),
    }
    _write(tmp_path / "ck", leaves)
    target = {"word_embeddings": None, "layers": {"block": {"w": None, "b": None}}, "lm_head": None}
    target["word_embeddings"] = jax.ShapeDtypeStruct((6, 4), jnp.float16)
    target["layers"]["block"]["w"] = jax.ShapeDtypeStruct((3, 5, 2), jnp.float32)
    target["layers"]["block"]["b"] = jax.ShapeDtypeStruct((3, 2), jnp.float32)
    target["lm_head"] = jax.ShapeDtypeStruct((4, 6), jnp.bfloat16)
    got = ocp.StandardCheckpointer().restore(str(tmp_path / "ck"), target)
    np.testing.assert_array_equal(np.asarray(got["word_embeddings"]), leaves[("word_embeddings",)][0])
    np.testing.assert_array_equal(np.asarray(got["layers"]["block"]["w"]), leaves[("layers", "block", "w")][0])
    np.testing.assert_array_equal(np.asarray(got["layers"]["block"]["b"]), 0)
    np.testing.assert_array_equal(np.asarray(got["lm_head"]), leaves[("lm_head",)][0])

    # A target in another dtype is cast on the way in; no target restores as stored.
    target["word_embeddings"] = jax.ShapeDtypeStruct((6, 4), jnp.float32)
    got = ocp.StandardCheckpointer().restore(str(tmp_path / "ck"), target)
    assert got["word_embeddings"].dtype == jnp.float32
    got = ocp.StandardCheckpointer().restore(str(tmp_path / "ck"))
    assert got["word_embeddings"].dtype == jnp.float16 and got["lm_head"].dtype == jnp.bfloat16

    reader = store.CheckpointReader(str(tmp_path / "ck"))
    assert set(reader.leaves) == set(leaves)
    np.testing.assert_array_equal(reader.read(("layers", "block", "w"), (1,)), leaves[("layers", "block", "w")][0][1])


def test_reader_opens_checkpoints_orbax_saved(tmp_path):
    tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "layers": {"block": {"w": np.ones((2, 3), np.float16)}}}
    ck = ocp.StandardCheckpointer()
    ck.save(str(tmp_path / "ck"), jax.tree.map(jnp.asarray, tree))
    ck.wait_until_finished()
    reader = store.CheckpointReader(str(tmp_path / "ck"))
    assert reader.use_ocdbt
    np.testing.assert_array_equal(reader.read(("a",)), tree["a"])
    np.testing.assert_array_equal(reader.read(("layers", "block", "w")), tree["layers"]["block"]["w"])
