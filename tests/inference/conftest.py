"""Session fixtures for the inference tests: one small model per position scheme, built once."""

import pytest

from glm_jax.inference.decode import Generator
from helpers import variant
from inference_fixtures import VARIANTS, random_params


@pytest.fixture(scope="session")
def models():
    """name -> (config, parameters)."""
    return {name: (variant(name), random_params(variant(name))) for name in VARIANTS}


@pytest.fixture(scope="session")
def generators(models):
    return {name: Generator(cfg, params) for name, (cfg, params) in models.items()}
