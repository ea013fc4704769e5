"""Evaluation in GLM-130B's task format (``python -m glm_jax.eval``): task files
(``task_config``), their data (``samples``), multiple-choice scoring (``multiple_choice``),
metrics (``metrics``) and the run over a task's files (``runner``)."""
