"""Keeping a converter's resident memory near one block, whatever the checkpoint's size.

Two things otherwise make RSS grow with the data that has gone through, not with what
is in use:

- Pages of a memory-mapped file that have been read stay resident (and count in RSS)
  until the mapping is dropped, which for a ``.bin`` shard or a ``.safetensors`` file
  (both are read as views of a private mapping of the whole file) is the whole file.
  :func:`release` hands a range back with ``madvise(MADV_DONTNEED)``; for a private,
  never-written mapping the kernel simply re-reads the pages if they are touched again.
- glibc raises its mmap threshold to the size of each large block freed, after which
  the converter's block-sized buffers come from malloc arenas that keep freed memory.
  :func:`return_freed_blocks` pins the threshold at 1 MiB so every block buffer is its
  own mapping, returned to the system when freed. It changes the whole process's
  allocator, so only the command-line entry point calls it.

Both are no-ops where the C library does not provide them.
"""

from __future__ import annotations

import ctypes
import os
import sys

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc = None


def maps_file(address: int, path: str) -> bool:
    """True if ``address`` lies in a mapping of the file at ``path`` (Linux /proc/self/maps).

    :func:`release` is only safe on such memory; this checks it rather than trusting
    how a library happens to load a file today.
    """
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            return int(parts[4]) == st.st_ino and os.makedev(major, minor) == st.st_dev
    return False


def release(address: int, nbytes: int) -> None:
    """Drop the whole pages inside ``[address, address + nbytes)`` of a never-written file mapping.

    Only for memory :func:`maps_file` vouches for: on anonymous memory it would zero the pages.
    """
    if _libc is None or nbytes <= 0:
        return
    start = -(-address // _PAGE) * _PAGE
    stop = (address + nbytes) // _PAGE * _PAGE
    if stop > start:
        _libc.madvise(start, stop - start, _MADV_DONTNEED)


def return_freed_blocks(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more with their own mappings (glibc)."""
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
