"""Shared command-line plumbing: ``--config PATH key=value ...`` and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from glm_jax.config import Config, ConfigError, load_config  # noqa: F401  (ConfigError re-exported)

DEFAULT_CONFIG = "configs/glm-tiny.yaml"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG} if present)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20 mesh.model=4")


def config_from_args(args: argparse.Namespace) -> Config:
    import os

    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main``; user errors become one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
