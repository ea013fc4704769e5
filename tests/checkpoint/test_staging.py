"""Outputs appear whole or not at all, with ordinary permissions, and an earlier killed
write leaves nothing behind for long (issue: nothing lost, no raw tracebacks)."""

import json
import os
import stat

import pytest

from glm_jax.checkpoint import directory
from glm_jax.errors import CheckpointError


def test_staged_output_is_all_or_nothing_with_ordinary_permissions(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with directory.staged_output(str(dst)) as tmp:
            (tmp_path / "marker").write_text(tmp)
            raise RuntimeError("interrupted")
    assert not dst.exists() and not os.path.exists((tmp_path / "marker").read_text())
    old = os.umask(0o022)
    try:
        with directory.staged_output(str(dst)) as tmp:
            open(os.path.join(tmp, "x"), "w").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o755  # not a temporary directory's 0700
    assert os.listdir(dst) == ["x"]  # the writer's record is gone
    with pytest.raises(CheckpointError, match="already exists"):
        with directory.staged_output(str(dst)):
            pass


def test_a_killed_writers_staging_directory_is_removed_and_a_live_ones_kept(tmp_path):
    dst = str(tmp_path / "out")
    dead, live = dst + ".partial-dead", dst + ".partial-live"
    for path, pid in ((dead, 2**22 + 12345), (live, os.getpid())):
        os.makedirs(path)
        with open(os.path.join(path, directory.WRITER), "w") as f:
            json.dump({"pid": pid, "host": os.uname().nodename}, f)
    notes = []
    with directory.staged_output(dst, log=notes.append):
        pass
    assert not os.path.exists(dead) and os.path.exists(live)
    assert len(notes) == 1 and dead in notes[0]
