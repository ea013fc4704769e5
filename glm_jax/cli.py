"""Shared command-line plumbing: ``--config PATH key=value ...`` and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from glm_jax.config import Config, ConfigError, load_config, shipped_configs  # noqa: F401  (ConfigError re-exported)
from glm_jax.errors import UserError, one_line

DEFAULT_CONFIG = "glm-tiny"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"a YAML file, or a shipped config by name: {', '.join(shipped_configs())} (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20 mesh.model=4")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main``; user errors (:class:`glm_jax.errors.UserError`) become one line on
    stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug of ours, not bad input: say so in one line, then the traceback
        print(f"error: glm_jax failed unexpectedly ({one_line(e)}); the traceback follows", file=sys.stderr, flush=True)
        raise
    sys.exit(code or 0)
