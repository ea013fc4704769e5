"""Training scalars as TensorBoard event files (flax's writer over tf.summary).

Only process 0 writes; elsewhere, and with ``train.tensorboard=false`` or no workdir,
the writer does nothing. TensorFlow is imported on first use and kept off accelerators.
"""

from __future__ import annotations

import os
from typing import Optional

from glm_jax.data import tf_runtime


class ScalarWriter:
    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._writer = None
        if directory:
            # TensorFlow takes seconds to import: only when TensorBoard output is on.
            tf_runtime.tensorflow()
            from flax.metrics.tensorboard import SummaryWriter

            os.makedirs(directory, exist_ok=True)
            self._writer = SummaryWriter(directory, auto_flush=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and value == value:  # NaN carries no information on a plot
                self._writer.scalar(tag, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
