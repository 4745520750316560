"""The evaluation harness: it sits on top of the library and uses only its public API.

* :mod:`~coinfer.experiments.data` — datasets (digits, MNIST, Fashion-MNIST, CIFAR-10) as tensors.
* :mod:`~coinfer.experiments.scenarios` — how the pool is partitioned among the k models.
* :mod:`~coinfer.experiments.train` — training the base model and its fine-tuned copies.
* :mod:`~coinfer.experiments.evaluate` — metrics of decoded outputs over erasure patterns.
* :mod:`~coinfer.experiments.config` — :class:`ExperimentConfig`, loadable from TOML.
* :mod:`~coinfer.experiments.presets` — the table of method variants (encoder, options, grid axes).
* :mod:`~coinfer.experiments.run` — one experiment, one function per step (:func:`run_seed`).
* :mod:`~coinfer.experiments.report` — aggregation over seeds into tables and plots.
* :mod:`~coinfer.experiments.commands` — the ``coinfer experiment`` and ``coinfer report`` commands.
* :mod:`~coinfer.experiments.demo` — the main job on the bundled digits.
"""
