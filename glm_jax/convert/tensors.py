"""numpy <-> torch without copies, and dtype names shared by both.

The converters move data as torch tensors while they permute it: torch's strided copy
runs on all cores and is about twice as fast as numpy's single-threaded one, which is
most of a conversion's CPU time. Tensorstore and the file writers take numpy arrays;
bfloat16 crosses over as int16 bits (numpy's bfloat16 is ml_dtypes', which tensorstore
understands too).
"""

from __future__ import annotations

import numpy as np

from glm_jax.convert.errors import ConvertError

_NP = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
       "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a torch dtype name."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(_NP[name])
    except KeyError:
        raise ConvertError(f"tensors of dtype {name} are not supported") from None


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """'float16' for torch.float16, np.float16 or 'float16'."""
    return str(dtype).removeprefix("torch.") if "torch." in str(dtype) else np.dtype(dtype).name


def to_numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor (it keeps the tensor alive)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def to_torch(a: np.ndarray):
    """A tensor view of a numpy array."""
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
