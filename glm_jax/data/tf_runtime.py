"""TensorFlow for the input pipeline: imported once, quietly, and kept off the accelerators.

tf.data runs on the host CPU only; JAX owns the accelerators, so TensorFlow is told to
see no GPU. Importing TensorFlow (and seqio, which loads tensorflow-text's kernels) writes
a block of start-up lines to stderr from C++ before any logging is configured: the
oneDNN notice, "could not find cuda drivers" and a failed cuInit on every host without a
GPU. They are captured at the file-descriptor level during the import and dropped; any
other line is passed on unchanged.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cudart_stub\.cc|"
    r"failed call to cuInit|cuda_platform\.cc|Could not find cuda drivers|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"TF-TRT Warning|This TensorFlow binary is optimized|computation placer already registered|"
    r"cuda_(dnn|fft|blas)\.cc|Attempting to register factory"
)


def tensorflow():
    """The ``tensorflow`` module, imported (with seqio) without its start-up noise, with
    no GPU visible to it."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import seqio  # noqa: F401  (imports tensorflow and tensorflow-text's kernels)
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass  # already initialised, with the same setting
            tf.config.list_logical_devices("CPU")  # start TF's runtime here (it probes CUDA once)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.search(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)
    return tf
