"""``python -m glm_jax.bench attention --json``: kernel and reference timings, and the
block-skip shares of typical GLM masks."""

import json

import pytest

from glm_jax.bench import attention
from glm_jax.config import ConfigError


def test_bench_reports_timings_and_block_skipping(capsys):
    assert attention.main(["--json", "--seq", "48", "--masks", "mask-packed", "--repeats", "1", "--blocks", "16,16,16,16",
                           "--skip-seqs", "2048"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["interpret"] and "not speed results" in out["note"]
    (row,) = out["timing"]
    for key in ("kernel_fwd_ms", "kernel_fwd_bwd_ms", "xla_fwd_ms", "xla_fwd_bwd_ms", "kernel_fwd_tflops", "speedup_fwd"):
        assert row[key] > 0, key
    skip = {(s["mask"], s["seq"]): s for s in out["skip"]}
    assert set(skip) == {(m, 2048) for m in attention.MASKS}
    # Causal at 2048 with 512-blocks: the 10 blocks on and below the diagonal of 16, the 6
    # strictly below it fully visible; the mask keeps just over half of the pairs.
    nb = 2048 // out["skip_block_sizes"]["kv"]
    causal = skip[("causal", 2048)]
    assert causal["fwd_visited"] == pytest.approx(nb * (nb + 1) / 2 / nb**2, abs=1e-4)
    assert causal["fwd_full"] == pytest.approx(nb * (nb - 1) / 2 / nb**2, abs=1e-4)
    assert causal["pairs_kept"] == pytest.approx(2049 / 4096, abs=1e-4)
    # Four packed samples of 512 visit the 4 diagonal blocks; more Part A visits more.
    assert skip[("mask-packed", 2048)]["fwd_visited"] == pytest.approx(4 / nb**2)
    assert skip[("gmask-25", 2048)]["fwd_visited"] < skip[("gmask-75", 2048)]["fwd_visited"]


def test_bad_bench_arguments_are_reported():
    with pytest.raises(ConfigError, match="mask 'diagonal' is not valid; valid values: causal"):
        attention.main(["--masks", "diagonal"])
    with pytest.raises(ConfigError, match="--blocks takes four sizes"):
        attention.main(["--blocks", "16,16"])
