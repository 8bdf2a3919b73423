"""Reference training loops, one module per paper: ``run(config) -> dict`` and a command-line entry.

* :mod:`bnas_fast.methods.ldn`: learnt-depth networks (seed 000), ``bnas-fast run ldn``.
"""

METHODS = ("ldn",)

__all__ = ["METHODS"]
