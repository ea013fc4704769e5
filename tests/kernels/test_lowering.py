"""The kernels build for real accelerators from this CPU host.

TPU: forward and backward compiled ahead of time by libtpu (Mosaic) for multi-chip v4,
v5e and v5p topologies at sequence 8192 and head_dim 128, inside shard_map over a
data x model mesh. GPU: the Triton lowering emits its three kernels.
"""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.kernels import flash_attention as fa

MEGACORE = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
TOPOLOGIES = [("v4:2x2x1", MEGACORE), ("v5e:2x2", {}), ("v5p:2x2x1", MEGACORE)]
KERNELS = ("glm_flash_fwd", "glm_flash_dq", "glm_flash_dkv")


def _loss(lowering, dropout):
    def loss(q, k, v, part_a_end, segment_ids, rng):
        o = fa.attention(q, k, v, part_a_end, segment_ids, layer_scale=jnp.float32(3.0), dropout_rate=dropout,
                         dropout_rng=rng, lowering=lowering, interpret=False)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _args(batch, length, heads, head_dim, qkv_sharding=None, token_sharding=None):
    qkv = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=qkv_sharding)
    tok = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=token_sharding)
    return (qkv, qkv, qkv, tok, tok, jax.random.key(0))


@pytest.mark.parametrize("topology, options", TOPOLOGIES, ids=[t for t, _ in TOPOLOGIES])
def test_tpu_kernels_compile_ahead_of_time(topology, options):
    assert importlib.util.find_spec("libtpu"), "libtpu is missing: pip install -r requirements-test.txt"
    topo = topologies.get_topology_desc(topology, "tpu", **options)
    mesh = topologies.make_mesh(topo, (2, 2), ("data", "model"))
    args = _args(4, 8192, 8, 128, NamedSharding(mesh, P("data", None, "model", None)), NamedSharding(mesh, P("data", None)))
    dropout = 0.1 if topology.startswith("v5p") else 0.0  # one topology also builds in-kernel dropout
    with jax.set_mesh(mesh):
        compiled = jax.jit(_loss("mosaic", dropout)).lower(*args).compile()
    hlo = compiled.as_text()
    calls = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
    assert sorted(re.search(r"(glm_flash_\w+?)[.\s]", c).group(1) for c in calls) == sorted(KERNELS)
    # Per device: two rows of 8192 tokens and four heads. One float32 8192 x 8192 score
    # matrix alone would take 256 MiB; the whole step's temporaries stay far below that.
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < 128 * 2**20, memory


def test_gpu_kernels_lower_to_triton():
    lowered = jax.jit(_loss("triton", 0.1)).trace(*_args(2, 1000, 4, 128)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == 3
    for name in KERNELS:
        assert name in text, name
