"""The on-disk formats: the one place that knows how parameters and training state are stored.

    directory       the params directory and the training workdir: names, resolving a
                    directory (and a step) to its config and parameter tree, staged writes
    params          reading a source's parameters checked against its config; write_config;
                    ``export`` (a workdir step -> a standalone params directory)
    store           orbax-layout zarr arrays through tensorstore, written and read chunk by chunk
    authors_layout  the authors' state-dict keys and layouts <-> our parameter tree (numpy)
    quantized       the authors' INT8/INT4 format: per-row scales, INT4 packing, kept tensors
    train_state     a workdir's train-state checkpoints (orbax CheckpointManager; imports jax)

Training, ``glm_jax.load``, inference and the converters read and write through these
modules; nothing else names an orbax path or opens tensorstore. Importing this package
(and every module but ``train_state``) does not import jax.
"""
