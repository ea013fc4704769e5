"""``python -m glm_jax.harness --model glm_jax --model_args checkpoint=DIR[,quantize=int4] --tasks ...``:
EleutherAI's lm-evaluation-harness command line (``lm_eval``, every flag of it) with glm_jax
registered as the model ``glm_jax`` (``glm_jax.evaluation.harness``). Needs the ``lm-eval``
package (``pip install "glm_jax[eval]"``). Nothing is downloaded: point ``--include_path``
at local task YAMLs whose data are local files (README, "Evaluation").
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from glm_jax.evaluation import harness  # registers the model; imports lm-eval, jax
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lm_eval":
            print("error: python -m glm_jax.harness needs lm-eval: pip install lm-eval", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    harness.main()


if __name__ == "__main__":
    main()
