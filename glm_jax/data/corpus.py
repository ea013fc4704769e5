"""The default corpus: docstrings of the Python standard library, built on this machine.

Nothing is downloaded and nothing is imported: each ``.py`` file of the running
interpreter's standard library is parsed with ``ast`` and every module, class and
function docstring becomes a document. The result is cached as text files (one
document per line, newlines escaped) under ``cache_dir()``:

  stdlib-train.txt, stdlib-validation.txt   documents; a fixed 2% (by hash) held out
  stdlib-instructions.jsonl                 {"prompt": "What does `json.dumps` do?", "response": ...}

Python's documentation strings are under the PSF licence, like the interpreter itself.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator

VALIDATION_PERCENT = 2
_VERSION = 1  # bump when the extraction changes, so caches rebuild


def cache_dir() -> str:
    root = os.environ.get("GLM_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "glm_jax"
    )
    os.makedirs(root, exist_ok=True)
    return root


def escape(text: str) -> str:
    """One document per line: backslashes and newlines escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            nxt = line[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def _docstrings(path: str, root: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module, its classes and functions."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    module = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
    module = module[: -len(".__init__")] if module.endswith(".__init__") else module
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    stack = [(module, node) for node in tree.body]
    while stack:
        prefix, node = stack.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield name, doc
            if isinstance(node, ast.ClassDef):
                stack.extend((name, child) for child in node.body)


def _is_validation(doc: str) -> bool:
    return int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def build(out_dir: str | None = None) -> dict[str, str]:
    """Write the corpus files (if not cached) and return their paths."""
    out_dir = out_dir or cache_dir()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{_VERSION}"
    paths = {
        "train": os.path.join(out_dir, f"stdlib-{tag}-train.txt"),
        "validation": os.path.join(out_dir, f"stdlib-{tag}-validation.txt"),
        "instructions": os.path.join(out_dir, f"stdlib-{tag}-instructions.jsonl"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    root = sysconfig.get_paths()["stdlib"]
    seen: set[str] = set()
    train, valid, instructions = [], [], []
    for path in _stdlib_files():
        for name, doc in _docstrings(path, root):
            doc = doc.strip()
            if len(doc) < 20 or doc in seen:
                continue
            seen.add(doc)
            (valid if _is_validation(doc) else train).append(escape(doc))
            summary = doc.split("\n\n")[0].strip()
            if 10 <= len(summary) <= 400 and "." in name:
                instructions.append(json.dumps({"prompt": f"What does `{name}` do?", "response": summary}))
    for key, lines in (("train", train), ("validation", valid), ("instructions", instructions)):
        tmp = paths[key] + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, paths[key])  # readers never see a half-written file
    return paths
