"""``python -m glm_jax.bench serve`` end to end on glm-tiny: every level serves every request,
the answers equal the one-at-a-time answers, no slot is left busy, and bad flags are one line."""

import json

import pytest

from glm_jax import cli
from glm_jax.bench import serve


def test_bench_serve_levels(capsys):
    assert serve.main(["--preset", "glm-tiny", "--clients", "1,3", "--requests", "5", "--prompt-len", "4,20",
                       "--max-tokens", "3,12", "--max-len", "64", "--bucket", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    one, three = out["results"]
    assert (one["clients"], three["clients"]) == (1, 3) and one["speedup"] == 1.0
    assert one["generated_tokens"] == three["generated_tokens"] > 0
    assert three["answers_differing"] == 0 and one["slots_left_busy"] == three["slots_left_busy"] == 0
    assert three["speedup"] == pytest.approx(three["tokens_per_s"] / one["tokens_per_s"])
    assert 0 < three["ttft_p50_s"] <= three["ttft_p99_s"] and 1 <= three["rows_per_step"] <= 3
    assert 0 < three["prefill_share"] + three["decode_share"] <= 1.0
    # One client is in flight until the end: its full-concurrency window holds every token.
    assert one["full_tokens"] == one["generated_tokens"] and one["full_seconds"] <= one["seconds"]
    assert 0 < three["full_tokens"] <= three["generated_tokens"] and three["full_seconds"] <= three["seconds"]
    assert three["full_speedup"] == pytest.approx(three["full_tokens_per_s"] / one["tokens_per_s"])


@pytest.mark.parametrize("flags, message", [
    (["--prompt-len", "9"], "--prompt-len '9': give MIN,MAX"),
    (["--max-tokens", "9,3"], "need 1 <= MIN <= MAX"),
    (["--clients", "0"], "--clients '0' is not valid"),
    (["--prompt-len", "100,200", "--max-len", "128"], "do not fit --max-len 128"),
])
def test_bench_serve_bad_flags(flags, message):
    with pytest.raises(cli.ConfigError, match=message):
        serve.main(["--preset", "glm-tiny", "--requests", "2"] + flags)
