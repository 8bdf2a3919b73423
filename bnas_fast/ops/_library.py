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


class _NoSecondDerivative(torch.autograd.Function):
    """Passes a gradient through, linked to the tensors it was computed from; differentiating it
    raises. (``once_differentiable`` links its error to nothing, so ``torch.autograd.grad`` of the
    gradient wrt an input reports "not used in the graph", and with ``allow_unused=True``
    returns None: a silent zero.)"""

    @staticmethod
    def forward(ctx, op, gradient, *sources):
        ctx.op = op
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op}: cannot differentiate twice: its backward has no derivative of its own "
                           "(a gradient taken with create_graph=True was differentiated again)")


def refuse_second_derivative(op: str, gradients, sources):
    """``gradients`` (a tuple, None entries allowed), each made to raise if differentiated: for an
    op's backward formula under ``create_graph=True`` when any of ``sources`` (the incoming
    gradient and the saved tensors) requires a gradient. Without that, as in every ordinary
    backward pass, they are returned as they are."""
    if not torch.is_grad_enabled():  # every ordinary backward pass: nothing to link, nothing to check
        return gradients
    linked = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    if not linked:
        return gradients
    return tuple(None if g is None else _NoSecondDerivative.apply(op, g.detach(), *linked) for g in gradients)
