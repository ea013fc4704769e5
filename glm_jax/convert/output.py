"""The converted checkpoint directory, and writing any output all-or-nothing.

A glm_jax checkpoint directory holds::

    config.yaml      the glm_jax config (glm_jax.config.dump_config); model.* describes the weights
    params/          an orbax checkpoint of the parameter tree (restorable by StandardCheckpointer)
    hf_source.json   (from-hf only) the source's config.json and what to-hf needs to write it back
    sat_source.json  (from-sat only) the SAT source's layout, iteration, key order and metadata
    quantized/       (from an INT8/INT4 checkpoint) the source's own quantized tensors

A converter writes into a temporary sibling of the destination and renames it into
place only when everything is written, so an interrupted run never leaves something
that looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from glm_jax.convert.errors import ConvertError

PARAMS = "params"
CONFIG = "config.yaml"
HF_SOURCE = "hf_source.json"
SAT_SOURCE = "sat_source.json"
QUANTIZED = "quantized"


@contextlib.contextmanager
def staged_output(dst: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes ``dst`` when the block finishes without error."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConvertError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
