"""from-sat streams: merging a 2-rank checkpoint whose word embeddings are 256 MiB raises
the converter's peak RSS above that of a process that only imports it by less than that
one tensor (at scale: ``python -m glm_jax.bench convert --format sat``)."""

from glm_jax.bench.convert import run_child, sat_overrides
from glm_jax.convert.from_sat import config_path


def test_from_sat_peak_rss_stays_below_one_tensor(tmp_path):
    sat, out = str(tmp_path / "sat"), str(tmp_path / "jax")
    sizes = dict(vocab=65536, hidden=2048, layers=1, heads=16, inner=256)
    run_child(["-c", f"from glm_jax.bench.convert import synthetic_sat; synthetic_sat({sat!r}, tp=2, **{sizes!r})"])
    base = run_child(["-c", "import numpy, torch, tensorstore, safetensors, yaml; import glm_jax.convert.from_sat"])
    conv = run_child(["-m", "glm_jax.convert", "from-sat", "--src", sat, "--dst", out, "--quiet",
                      "--config", config_path("glm-tiny.yaml"), *sat_overrides(**sizes)])
    tensor_mb = 65536 * 2048 * 2 / 2**20
    grew = conv["peak_rss_mb"] - base["peak_rss_mb"]
    assert grew < tensor_mb, f"from-sat peak RSS grew {grew:.0f} MB over the import baseline (one tensor: {tensor_mb:.0f} MB)"
