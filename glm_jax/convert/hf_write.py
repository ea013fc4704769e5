"""Writing state-dict files one tensor at a time: ``pytorch_model.bin`` and ``.safetensors``.

``torch.save`` needs the whole state dict in memory. The files it writes are a zip of
``data.pkl`` (the pickled dict, in which each tensor refers to a storage by key) and one
``data/<key>`` record per storage, pickle first. So the pickle is written from
placeholders that pickle exactly as a contiguous CPU tensor does
(``torch._utils._rebuild_tensor_v2`` on a persistent ``("storage", <dtype>Storage, key,
"cpu", numel)``), and each storage record is produced by ``fill`` only when it is
written, through torch's own zip writer; the file loads with ``torch.load(...,
weights_only=True)``. Peak memory is one tensor.

Safetensors is simpler still: a JSON header with every tensor's byte range, then the
bytes in order, so rows are written as they come and memory is one block.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pickle
import struct
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from glm_jax.convert.tensors import np_dtype

# fill(key) yields the tensor's rows in order, as numpy arrays of its dtype.
RowsFn = Callable[[str], Iterator[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class OutTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str  # torch's name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np_dtype(self.dtype).itemsize


class _Storage:
    """Stands in for a tensor's storage while the state dict is pickled."""

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as a contiguous CPU tensor of ``storage`` without allocating it."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= n
        args = (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


def _storage_type(dtype: str):
    import torch

    name = torch.storage._dtype_to_storage_type_map()[getattr(torch, dtype)]
    return getattr(torch, name)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        return None


class BinWriter:
    """A ``torch.save``-compatible file: the pickle of every tensor's placeholder first, then
    :meth:`write` each tensor's storage record (in any order), then :meth:`close`.

    ``wrap`` builds the pickled object around the state dict (e.g. SAT's
    ``{"module": state_dict, ...}``); by default the state dict itself is saved.
    """

    def __init__(self, path: str, tensors: Sequence[OutTensor], wrap: Optional[Callable[[dict], Any]] = None):
        import torch
        from torch.serialization import _open_zipfile_writer

        state = {}
        self._storages: dict[str, tuple[OutTensor, _Storage]] = {}
        for i, t in enumerate(tensors):
            s = _Storage(str(i), t.dtype, int(np.prod(t.shape, dtype=np.int64)))
            self._storages[t.key] = (t, s)
            state[t.key] = _Tensor(s, t.shape)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(wrap(state) if wrap else state)
        data = buf.getvalue()
        self._cm = _open_zipfile_writer(path)
        self._zf = self._cm.__enter__()
        self._zf.write_record("data.pkl", data, len(data))
        self._zf.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._zf.write_record(".storage_alignment", alignment, len(alignment))
        self._zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._written: set[str] = set()

    def write(self, key: str, value: np.ndarray) -> None:
        """The whole tensor ``key`` (its shape and dtype as declared)."""
        t, s = self._storages[key]
        value = np.require(value, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if value.shape != t.shape or value.dtype != np_dtype(t.dtype):
            raise AssertionError(f"{key}: got {value.dtype}{list(value.shape)}, declared {t.dtype}{list(t.shape)}")
        self._zf.write_record(f"data/{s.key}", _as_storage(value), value.nbytes)
        self._written.add(key)

    def close(self) -> None:
        missing = [k for k in self._storages if k not in self._written]
        if missing:
            raise AssertionError(f"tensors never written: {missing[:3]}")
        self._cm.__exit__(None, None, None)
        self._cm = None

    def abort(self) -> None:
        """Give up on the file after an error: finish the zip now, while its file exists.
        Left to the garbage collector, torch's writer would finish it whenever it is
        collected, after the staging directory is gone, and abort the process."""
        if self._cm is not None:
            cm, self._cm = self._cm, None
            try:
                cm.__exit__(None, None, None)
            except Exception:  # the file is being discarded; the first error is the one to report
                pass

    def __enter__(self) -> "BinWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()


def write_bin(path: str, tensors: Sequence[OutTensor], rows: RowsFn) -> None:
    """A ``torch.save``-compatible state dict file, materialising one tensor at a time."""
    with BinWriter(path, tensors) as out:
        _write_bin_tensors(out, tensors, rows)
        out.close()


def _write_bin_tensors(out: BinWriter, tensors: Sequence[OutTensor], rows: RowsFn) -> None:
    for t in tensors:
        whole = np.empty(t.shape, np_dtype(t.dtype))
        flat = whole.reshape((whole.shape[0] if whole.ndim else 1, -1))
        r = 0
        for part in rows(t.key):
            n = part.shape[0] if part.ndim else 1
            flat[r:r + n] = part.reshape(n, -1)
            r += n
        if r != flat.shape[0]:
            raise AssertionError(f"{t.key}: {r} rows written, {flat.shape[0]} expected")
        out.write(t.key, whole)
        del whole, flat


def _as_storage(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).untyped_storage()


_ST_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "bfloat16": "BF16", "int8": "I8", "uint8": "U8",
              "int32": "I32", "int64": "I64", "bool": "BOOL"}


def write_safetensors(path: str, tensors: Sequence[OutTensor], rows: RowsFn) -> None:
    """A safetensors file: the header first (all sizes are known), then rows as they come."""
    header, offset = {}, 0
    for t in tensors:
        header[t.key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for part in rows(t.key):
                part = np.ascontiguousarray(part, np_dtype(t.dtype))
                f.write(part.view(np.uint8).reshape(-1).data)
                written += part.nbytes
            if written != t.nbytes:
                raise AssertionError(f"{t.key}: {written} bytes written, {t.nbytes} expected")


def shard(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Split into consecutive groups of at most ``max_bytes`` (a larger tensor goes alone)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def shard_names(fmt: str, n: int) -> tuple[list[str], str]:
    """(file names, index name) in Hugging Face's naming."""
    if fmt == "bin":
        stem, ext, index = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        stem, ext, index = "model", "safetensors", "model.safetensors.index.json"
    if n == 1:
        return [f"{stem}.{ext}"], index
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)], index
