"""Reference training loops, one module per paper: ``run(config) -> dict`` and a command-line entry.

* :mod:`bnas_fast.methods.ldn`: learnt-depth networks (seed 000), ``bnas-fast run ldn``.
* :mod:`bnas_fast.methods.pgnas`: PGNAS, Gumbel-sigmoid dropout on kernels (seed 001), ``bnas-fast run pgnas``.
* :mod:`bnas_fast.methods.nsa`: networks with stochastic architectures (seed 002), ``bnas-fast run nsa``.
* :mod:`bnas_fast.methods.bayesnas`: BayesNAS (seed 003), ``bnas-fast run bayesnas``.
* :mod:`bnas_fast.methods.oneshot`: one-shot architecture search (seed 004), ``bnas-fast run oneshot``.
"""

METHODS = ("ldn", "pgnas", "nsa", "bayesnas", "oneshot")

__all__ = ["METHODS"]
