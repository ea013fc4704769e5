"""Reading a tensor-parallel SAT checkpoint a run of merged rows at a time.

    DIR/latest                                the iteration (the original GLM also writes
                                              latest_checkpointed_iteration.txt)
    DIR/<iteration>/mp_rank_XX_model_states.pt  one per rank: {"module": state_dict, ...}

Every rank file is opened at once, each as a memory mapping (``glm_jax.convert.mapped``:
``torch.load(mmap=True, weights_only=True)``), and nothing is read up front but the
tensors' names, shapes and dtypes. :meth:`SatSource.pieces` then hands out the rows of
each rank that make up a run of the *merged* tensor's rows (``glm_jax.convert.sat_layout``
says which), and the mapped pages are given back when the run is done, so memory stays
near one block whatever the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Iterator

from glm_jax.convert.errors import ConvertError
from glm_jax.convert.mapped import MappedFile, torch_load
from glm_jax.convert.sat_layout import Split
from glm_jax.convert.tensors import dtype_name

TRACKERS = ("latest", "latest_checkpointed_iteration.txt")
_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    shape: tuple[int, ...]
    dtype: str  # torch's name


class RankFile(MappedFile):
    """One rank's ``{"module": state_dict, ...}``, its tensors views of a mapping of the file."""

    def __init__(self, path: str):
        import torch

        self.path, self._mapped = path, {}
        obj = torch_load(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
            found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ConvertError(f"{path}: expected a dict whose 'module' is the state dict, as SAT saves it; found {found}")
        for k, v in obj["module"].items():
            if not isinstance(v, torch.Tensor):
                raise ConvertError(f"{path}: module[{k!r}] is a {type(v).__name__}, not a tensor")
        self.tensors: dict = obj["module"]
        self.top_keys = list(obj)
        self.metadata = {k: v for k, v in obj.items() if k != "module"}

    def info(self, key: str) -> ShardInfo:
        t = self.tensors[key]
        return ShardInfo(tuple(t.shape), dtype_name(t.dtype))

    def _tensor(self, key: str):
        return self.tensors[key]


def read_tracker(directory: str) -> tuple[str, dict[str, str]]:
    """(the iteration named by the tracker file, {tracker file name: its text})."""
    texts = {}
    for name in TRACKERS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                texts[name] = f.read()
    if not texts:
        here = any(_RANK_FILE.fullmatch(n) for n in os.listdir(directory))
        raise ConvertError(
            f"{directory}: no 'latest' file (nor latest_checkpointed_iteration.txt) naming the iteration; a SAT "
            "checkpoint is DIR/latest plus DIR/<iteration>/mp_rank_XX_model_states.pt"
            + ("; this directory holds the rank files itself: pass its parent, with a 'latest' naming it" if here else "")
        )
    name, text = next(iter(texts.items()))
    iteration = text.strip()
    if not iteration or os.sep in iteration or iteration in (".", ".."):
        raise ConvertError(f"{os.path.join(directory, name)}: {text!r} is not an iteration")
    for other, t in texts.items():
        if t.strip() != iteration:
            raise ConvertError(f"{directory}: {name} names iteration {iteration} but {other} names {t.strip()}")
    if not os.path.isdir(os.path.join(directory, iteration)):
        raise ConvertError(f"{os.path.join(directory, name)} names iteration {iteration}, but {os.path.join(directory, iteration)} is not a directory")
    return iteration, texts


def rank_files(step_dir: str) -> list[str]:
    """The rank files of an iteration directory, in rank order; a gap is an error naming the missing file."""
    found = {}
    for name in os.listdir(step_dir):
        m = _RANK_FILE.fullmatch(name)
        if m:
            found[int(m.group(1))] = os.path.join(step_dir, name)
    if not found:
        raise ConvertError(f"{step_dir}: no mp_rank_XX_model_states.pt files")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        have = ", ".join(f"{r:02d}" for r in sorted(found))
        raise ConvertError(f"{os.path.join(step_dir, rank_file_name(missing[0]))} is missing (found ranks {have})")
    return [found[r] for r in range(len(found))]


class SatSource:
    """The rank files of a SAT checkpoint: names, shapes and dtypes, and merged rows on demand."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConvertError(f"{directory} is not a directory")
        self.directory = directory
        self.iteration, self.trackers = read_tracker(directory)
        self.step_dir = os.path.join(directory, self.iteration)
        paths = rank_files(self.step_dir)
        self.ranks = [RankFile(p) for p in paths]
        self.tp = len(self.ranks)
        for f in self.ranks:
            size = f.metadata.get("mp_world_size")
            if isinstance(size, int) and size != self.tp:
                raise ConvertError(
                    f"{f.path}: mp_world_size is {size}, but {self.tp} rank files are present"
                    + (f" ({rank_file_name(self.tp)} is missing)" if size > self.tp else "")
                )
        first = self.ranks[0]
        self.keys = list(first.tensors)
        for f in self.ranks[1:]:
            for k in f.tensors:
                if k not in first.tensors:
                    raise ConvertError(f"{f.path}: has tensor {k}, which {first.path} lacks (ranks disagree)")
            for k in self.keys:
                if k not in f.tensors:
                    raise ConvertError(f"{f.path}: lacks tensor {k}, which {first.path} has (ranks disagree)")

    def info(self, key: str) -> ShardInfo:
        """Rank 0's shape and dtype of ``key``; every other rank must agree."""
        want = self.ranks[0].info(key)
        for f in self.ranks[1:]:
            got = f.info(key)
            if got != want:
                raise ConvertError(
                    f"{f.path}: {key} is {got.dtype}{list(got.shape)}, but in {self.ranks[0].path} it is "
                    f"{want.dtype}{list(want.shape)} (ranks disagree)"
                )
        return want

    def shard_nbytes(self, key: str) -> int:
        t = self.ranks[0].tensors[key]
        return t.numel() * t.element_size()

    @contextlib.contextmanager
    def pieces(self, key: str, split: Split, start: int, stop: int) -> Iterator[list]:
        """The rank rows making up merged rows ``[start, stop)`` (along dimension 0 of the merged
        tensor; for a ``stacked`` scale, along its dimension 1), as torch views valid inside the ``with``:

        rows: the pieces in merged order, to join along dimension 0;
        cols / stacked: every rank's rows, to join along dimension 1 / stack;
        replicated: every rank's copy (:meth:`check_replicated` checks they are equal).
        """
        with contextlib.ExitStack() as stack:
            if split.kind == "rows":
                rows = self.ranks[0].tensors[key].shape[0] * self.tp
                parts = [stack.enter_context(self.ranks[r].block(key, a, b))
                         for r, a, b in split.row_pieces(rows, self.tp, start, stop)]
            else:
                parts = [stack.enter_context(f.block(key, start, stop)) for f in self.ranks]
            yield parts

    def check_replicated(self, key: str, parts: list) -> None:
        """Every rank's copy of a replicated tensor (``pieces`` of it) is the same bytes."""
        import torch

        for f, p in zip(self.ranks[1:], parts[1:]):
            if not torch.equal(p.view(torch.uint8), parts[0].view(torch.uint8)):
                raise ConvertError(f"{f.path}: {key} differs from {self.ranks[0].path}'s copy (a replicated tensor must be equal on every rank)")
