"""INT8/INT4 weights bit for bit against a torch restatement of the authors' QuantizedLinear."""

import numpy as np
import pytest
import torch

from convert.chatglm_fixtures import authors_quantize
from glm_jax.checkpoint import quantized


def weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(256, 96, generator=g) * 10 ** torch.empty(256, 1).uniform_(-4, 1, generator=g)
    rows[0, :] = 0.0  # an all-zero row
    rows[1, :7] = torch.tensor([3.5, -3.5, 2.5, 0.5, -0.5, 7.0, -7.0]) * 0.01  # halfway cases
    return rows.half()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_matches_the_authors(bits, seed):
    w = weights(seed)
    want_q, want_s = authors_quantize(w[2:], bits)  # (the authors' code divides 0 by 0 on zero rows)
    got_q, got_s = quantized.quantize(w.numpy(), bits)
    np.testing.assert_array_equal(got_s[2:].view(np.uint16), want_s.numpy().view(np.uint16))
    np.testing.assert_array_equal(got_q[2:], want_q.numpy())
    assert got_q.shape == quantized.packed_shape(tuple(w.shape), bits) and got_q.dtype == np.int8
    assert (got_q[0] == 0).all() and got_s[0] == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_and_packing(bits):
    w = weights(3)
    q, s = quantized.quantize(w.numpy(), bits)
    deq = quantized.dequantize(q, s, bits)
    unpacked = quantized.unpack_int4(q) if bits == 4 else q
    assert np.abs(unpacked).max() <= 2 ** (bits - 1) - 1
    want = (torch.from_numpy(unpacked).half() * torch.from_numpy(s)[:, None]).numpy()  # fp16 q * scale
    np.testing.assert_array_equal(deq.view(np.uint16), want.view(np.uint16))
    normal = s >= np.finfo(np.float16).tiny  # subnormal fp16 scales lose precision by design
    err = np.abs(deq.astype(np.float32) - w.float().numpy())[normal] / s.astype(np.float32)[normal][:, None]
    # half a step, plus the fp16 rounding of W/scale before round() (up to 1/32 near 127) and of q*scale
    assert err.max() <= 0.6
    if bits == 4:
        every = np.arange(-8, 8, dtype=np.int8)
        pairs = np.stack(np.meshgrid(every, every), -1).reshape(1, -1)
        np.testing.assert_array_equal(quantized.unpack_int4(quantized.pack_int4(pairs)), pairs)
        assert quantized.pack_int4(np.array([[-1, 2]], np.int8))[0, 0] == np.int8(-14)  # 0xF2: high nibble first
