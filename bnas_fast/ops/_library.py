"""The ``bnas_fast`` operator namespace: one torch.library.Library that every op file defines into,
and the eager route around the ops' registered autograd."""

import torch

LIB = torch.library.Library("bnas_fast", "DEF")


def use_eager_function() -> bool:
    """Whether a public function may run its op through a plain ``torch.autograd.Function``.

    The autograd formula registered with ``torch.library.register_autograd`` runs inside a Python
    wrapper of its own on every call and again in the backward: 0.1 to 0.2 ms per forward+backward
    on this 2-core CPU, about 10% of an NSA-i training step with 24 such calls. Each op file also
    defines an ``autograd.Function`` that calls the same kernels below the autograd key with the same
    backward formula. The public functions use it in eager mode and call the op itself under
    ``torch.compile``, which must see the registered op.
    """
    return not torch.compiler.is_compiling()


def below_autograd():
    """A context in which op calls skip the autograd key (the Function records the graph itself)."""
    return torch._C._AutoDispatchBelowAutograd()
