"""from-hf streams below the size of one tensor: converting a checkpoint whose two
largest tensors are 256 MiB each raises the converter's peak RSS above that of a
process that only imports it by less than one such tensor (GLM-130B-scale runs:
``python -m glm_jax.bench convert``)."""

from glm_jax.bench.convert import run_child


def test_from_hf_peak_rss_stays_below_one_tensor(tmp_path):
    hf, out = str(tmp_path / "hf"), str(tmp_path / "jax")
    spec = dict(vocab=65536, hidden=2048, layers=1, heads=16, inner=2048)
    run_child(["-c", f"from glm_jax.bench.convert import synthetic_hf; synthetic_hf({hf!r}, **{spec!r})"])
    base = run_child(["-c", "import numpy, torch, tensorstore, safetensors, yaml; import glm_jax.convert.from_hf"])
    conv = run_child(["-m", "glm_jax.convert", "from-hf", "--src", hf, "--dst", out, "--quiet"])
    tensor_mb = 65536 * 2048 * 2 / 2**20
    grew = conv["peak_rss_mb"] - base["peak_rss_mb"]
    assert grew < tensor_mb, f"from-hf peak RSS grew {grew:.0f} MB over the import baseline (one tensor: {tensor_mb:.0f} MB)"
