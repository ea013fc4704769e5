"""What a new user meets in the first hour of ``python -m glm_jax.train``: tiny or
unreadable corpora, a 1-step run, the first progress line (issue: nothing lost, no raw
tracebacks)."""

import json

import pytest

from glm_jax import cli, train
from glm_jax.data import tasks

COMMON = ("train.seq_len=64", "train.batch_size=8", "train.log_every=1", "train.eval_batches=1", "data.mixture=gmask",
          "data.pack=false", "train.tensorboard=false")


def run(capsys, *overrides):
    with pytest.raises(SystemExit) as e:
        cli.run_main(train.main, list(COMMON + overrides))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def small_corpus(path, n=20):
    """n documents, none of which falls in the 2% held-out split."""
    lines, i = [], 0
    while len(lines) < n:
        doc = f"Document {i} talks about the river, the hills and the old stone bridge near town."
        if tasks._in_split(doc, "train"):
            lines.append(doc)
        i += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_tiny_corpus_trains_and_skips_eval_with_one_warning(tmp_path, capsys):
    small_corpus(tmp_path / "small.txt")
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 64)  # a binary file among the text
    tasks.reset_stats()
    code, out, err = run(capsys, f"data.corpus=text:{tmp_path}/*.txt", "train.steps=2", "train.eval_every=1",
                         f"workdir={tmp_path / 'w'}")
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "validation split" in warnings[0] and "yields no examples" in warnings[0]
    result = json.loads(out.splitlines()[-1])
    assert result["step"] == 2 and result["eval_loss"] is None
    assert result["skipped_input"] == {"binary_files": 1}
    assert "input skipped 1" in next(line for line in err.splitlines() if line.startswith("step 2/2"))
    assert (tmp_path / "w" / "checkpoints" / "2").is_dir()  # saved, eval or not


def test_a_corpus_with_nothing_readable_is_one_line(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(20)) + "\n")
    code, out, err = run(capsys, f"data.corpus=jsonl:{path}:text", "train.steps=2")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: data: the train split of data.corpus=jsonl:") and "yields no examples" in line
    assert "20 unreadable_documents" in line
    code, out, err = run(capsys, f"data.corpus=text:{tmp_path}/nothing-*.txt", "train.steps=2")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: no file matches {tmp_path}/nothing-*.txt"
    assert "glm_jax.train: model" not in err  # refused before any model or mesh is built


def test_a_one_step_run_learns_and_its_first_line_has_no_nan(capsys):
    code, out, err = run(capsys, "data.mixture=synthetic", "train.steps=1", "train.warmup_steps=5")
    assert code == 0
    line = next(line for line in err.splitlines() if line.startswith("step 1/1"))
    assert "nan" not in line and "first step" in line and "(with compilation)" in line
    lr = float(line.split("lr ")[1].split()[0])
    assert lr > 0  # the first update moves the weights, whatever the warmup


def test_sigterm_during_start_up_stops_cleanly(tmp_path):
    """Preempted while restoring or compiling: no native stack dump, exit 0, nothing lost."""
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "glm_jax.train", *COMMON, "data.mixture=synthetic", "train.steps=50",
           f"workdir={tmp_path / 'w'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("glm_jax.train: model"):  # jax is up; the model is not built yet
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    err = "".join(seen) + err
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Fatal" not in err and "SIGTERM received" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] and result["step"] == 0


def test_commands_start_quietly_on_a_cpu_host(tmp_path):
    """No libtpu error block (where the host has no accelerator) and no TensorFlow start-up
    lines: stderr holds only our own."""
    import os
    import subprocess
    import sys

    from glm_jax import host
    from glm_jax.data import tf_runtime

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # A fresh shell's environment: without what conftest and jax (TPU_LIBRARY_PATH, ...) set here.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "TPU_LIBRARY_PATH",
                                                              "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    p = subprocess.run([sys.executable, "-m", "glm_jax.data.inspect", "--n", "1", "train.seq_len=64"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith(("reader:", "glm_jax"))]
    assert not [line for line in lines if tf_runtime.NOISE.search(line)], lines
    if not host.has_accelerator(env):  # where jax may rightly talk about a TPU or GPU, only TF's lines are checked
        assert lines == [], lines
