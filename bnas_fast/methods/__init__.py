"""Reference training loops, one module per paper: ``run(config) -> dict`` and a command-line entry.

* :mod:`bnas_fast.methods.ldn`: learnt-depth networks (seed 000), ``bnas-fast run ldn``.
* :mod:`bnas_fast.methods.nsa`: networks with stochastic architectures (seed 002), ``bnas-fast run nsa``.
"""

METHODS = ("ldn", "nsa")

__all__ = ["METHODS"]
