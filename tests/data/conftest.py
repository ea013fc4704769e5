"""Data tests share one cache (corpus, trained vocabulary) per session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def glm_jax_cache(tmp_path_factory):
    path = os.environ.get("GLM_JAX_TEST_CACHE") or str(tmp_path_factory.mktemp("glm_jax_cache"))
    old = os.environ.get("GLM_JAX_CACHE")
    os.environ["GLM_JAX_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("GLM_JAX_CACHE", None)
    else:
        os.environ["GLM_JAX_CACHE"] = old
