"""Torch weight files read a few rows at a time from a memory mapping.

A ``torch.save`` file is opened with ``torch.load(mmap=True, weights_only=True)``: no
code from the pickle runs, and every tensor is a view of a private mapping of the
file. A reader hands out rows of a tensor inside a ``with`` block and, when the block
ends, gives the mapped pages back (``glm_jax.convert.memory.release``), so reading a
32 GB shard never makes 32 GB of RSS. The Hugging Face and SAT readers both build on
this.
"""

from __future__ import annotations

import abc
import contextlib
import pickle
from typing import Iterator

import numpy as np

from glm_jax.convert import memory
from glm_jax.convert.errors import ConvertError


def _numpy_globals() -> list:
    """What a numpy array in a checkpoint's metadata (e.g. DeepSpeed's saved RNG state)
    needs to unpickle: plain data types, no code."""
    reconstruct = np._core.multiarray._reconstruct
    # files written under numpy 1.x name the function by its old module
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def torch_load(path: str):
    """``torch.load`` of ``path``, memory-mapped where the format allows, as plain data only.

    Besides tensors and Python containers, numpy arrays are allowed (training metadata
    such as RNG states holds them); any other object, a torn file or a file that is not
    a torch checkpoint is a :class:`ConvertError` naming the file.
    """
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (pre-zip) serialization cannot be mapped: read it whole.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConvertError(
            f"{path}: cannot be read by torch.load: not a torch checkpoint, or it holds objects other than "
            "tensors and plain data (weights_only loading refuses those)"
        ) from None
    except Exception as e:  # a torn or truncated file
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConvertError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {first[:200]})") from None


class MappedFile(abc.ABC):
    """Rows of one weight file as tensor views; pages of a mapped file are released after each block.
    Each format (.bin, safetensors, SAT rank files) says how to view one tensor."""

    path: str
    _mapped: dict[str, bool]

    @abc.abstractmethod
    def _tensor(self, key: str):
        """The whole tensor ``key`` as a torch view (memory-mapped where the format allows)."""

    @contextlib.contextmanager
    def block(self, key: str, start: int, stop: int) -> Iterator:
        """Rows ``[start, stop)``; valid only inside the ``with`` (it may view a mapping)."""
        t = self._tensor(key)
        part = t[start:stop] if t.dim() else t
        try:
            yield part
        finally:
            if key not in self._mapped:
                self._mapped[key] = t.numel() > 0 and t.is_contiguous() and memory.maps_file(t.data_ptr(), self.path)
            if self._mapped[key] and part.is_contiguous():
                memory.release(part.data_ptr(), part.numel() * part.element_size())
