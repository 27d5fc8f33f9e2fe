"""The training pipeline: ``python -m train STAGE [key=value ...]``.

Stages, in order (each one's output ``run.dir/model.safetensors`` is a later stage's ``init.*``):
``autoencoder`` (0), ``teacher`` (1, bidirectional), ``ar_teacher`` (2, teacher forcing),
``causal_cd`` (3a, Causal Forcing++) or ``causal_ode`` (3b, Causal Forcing), ``dmd`` (4, the
shipped model). Algorithms are pure functions in :mod:`train.algorithms`; :mod:`train.trainer`
holds the one training loop; configs live in ``train/configs``.
"""
