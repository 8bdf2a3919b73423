"""The eager route of the public functions (``bnas_fast.ops._library.use_eager_function``): a plain
torch.autograd.Function around the same kernels, instead of the registered autograd's wrapper. It
must give what the registered op gives, bit for bit, forward and backward, and refuse a second
derivative instead of returning a wrong one."""

import pytest
import torch

import bnas_fast


def _grads(outputs, inputs, grad):
    return torch.autograd.grad(outputs, inputs, grad, allow_unused=True)


def _mix_case(weights_grad):
    gen = torch.Generator().manual_seed(0)
    ys = [torch.randn(5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weights = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    weights[1, 2] = 0.0  # a skipped read
    weights.requires_grad_(weights_grad)
    return ys, weights


@pytest.mark.parametrize("weights_grad", [True, False])
def test_mix_eager_equals_the_registered_op(weights_grad):
    ys, weights = _mix_case(weights_grad)
    out = bnas_fast.mix(ys, weights)
    assert type(out.grad_fn).__name__ == "_MixFunctionBackward"
    expected = torch.ops.bnas_fast.mix(ys, weights)
    assert torch.equal(out, expected)
    inputs = ys + ([weights] if weights_grad else [])
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, inputs, grad), _grads(expected, inputs, grad)):
        assert torch.equal(got, want)


def test_mix_sparse_eager_equals_the_registered_op():
    gen = torch.Generator().manual_seed(1)
    indices = [torch.tensor([0, 2, 4]), torch.tensor([1, 3]), torch.tensor([4, 0, 1, 2])]
    ys = [torch.randn(len(i), 6, generator=gen, dtype=torch.float64, requires_grad=True) for i in indices]
    weights = torch.rand(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    out = bnas_fast.mix_sparse(ys, indices, weights)
    assert type(out.grad_fn).__name__ == "_MixSparseFunctionBackward"
    expected = torch.ops.bnas_fast.mix_sparse(ys, indices, weights)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, ys + [weights], grad), _grads(expected, ys + [weights], grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("group_size", [None, 2])
def test_arch_batch_norm_eager_equals_the_registered_op(group_size):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    arch = torch.tensor([0, 1, 1, 0, 2, 1])
    weight = torch.rand(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = bnas_fast.arch_batch_norm(x, arch, weight, bias, group_size=group_size)
    assert type(y.grad_fn).__name__ == "_ArchBatchNormFunctionBackward"
    expected = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, group_size or 6, 1e-5)[0]
    assert torch.equal(y, expected)
    grad = torch.randn_like(y)
    for got, want in zip(_grads(y, [x, weight, bias], grad), _grads(expected, [x, weight, bias], grad)):
        assert torch.equal(got, want)


def test_channel_affine_eager_equals_the_registered_op():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = bnas_fast.channel_affine(x, scale, shift)
    assert type(y.grad_fn).__name__ == "_ChannelAffineFunctionBackward"
    expected = torch.ops.bnas_fast.channel_affine(x, scale, shift)
    assert torch.equal(y, expected)
    grad = torch.randn_like(y)
    for got, want in zip(_grads(y, [x, scale, shift], grad), _grads(expected, [x, scale, shift], grad)):
        assert torch.equal(got, want)


def test_a_second_derivative_is_refused():
    ys, weights = _mix_case(True)
    (grad_y0,) = torch.autograd.grad(bnas_fast.mix(ys, weights).pow(2).sum(), ys[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_y0.sum().backward()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(
        bnas_fast.arch_batch_norm(x, torch.zeros(6, dtype=torch.long)).pow(3).sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


def test_ops_without_an_eager_function_refuse_a_second_derivative():
    """depth_loglik and gumbel_sigmoid_dropout run through their registered autograd; their
    backward ops have no derivative of their own, and gradients taken with create_graph=True
    differentiated silently to zero (second derivative 0.0 against 55.0 for depth_loglik, in a
    review of 2026-12-02). Differentiating such a gradient now raises, also through
    torch.autograd.grad with allow_unused=True, and an ordinary backward pass is unchanged."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)
    log_q = torch.log_softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0)
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    cases = {
        "depth_loglik": (lambda: bnas_fast.depth_loglik(logits, targets, log_q).pow(3).sum(), logits),
        "gumbel_sigmoid_dropout": (lambda: bnas_fast.gumbel_sigmoid_dropout(x, lam, seed_offset=torch.tensor([1, 2])).sum(), lam),
    }
    for name, (loss, wrt) in cases.items():
        (first,) = torch.autograd.grad(loss(), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match=f"{name}: cannot differentiate twice"):
            torch.autograd.grad(first.sum(), wrt, allow_unused=True)
        (first,) = torch.autograd.grad(loss(), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match=f"{name}: cannot differentiate twice"):
            first.pow(2).sum().backward()
        (plain,) = torch.autograd.grad(loss(), wrt)
        assert not plain.requires_grad and torch.equal(plain, first.detach())


def test_a_second_derivative_is_refused_also_with_allow_unused():
    """once_differentiable linked its error to nothing: torch.autograd.grad of a gradient through
    mix or arch_batch_norm, with allow_unused=True, returned None where the true second derivative
    is not zero (a review of 2026-12-02). The refusal is now linked to the inputs, and raises."""
    ys, weights = _mix_case(True)
    (grad_y0,) = torch.autograd.grad(bnas_fast.mix(ys, weights).pow(2).sum(), ys[0], create_graph=True)
    with pytest.raises(RuntimeError, match="mix: cannot differentiate twice"):
        torch.autograd.grad(grad_y0.sum(), [ys[0], weights], allow_unused=True)
    indices = [torch.tensor([0, 2, 4]), torch.tensor([1]), torch.tensor([0, 3])]
    sparse_ys = [torch.randn(len(i), 4, dtype=torch.float64, requires_grad=True) for i in indices]
    (grad_sparse,) = torch.autograd.grad(bnas_fast.mix_sparse(sparse_ys, indices, weights.detach().requires_grad_()).pow(2).sum(),
                                         sparse_ys[0], create_graph=True)
    with pytest.raises(RuntimeError, match="mix: cannot differentiate twice"):
        torch.autograd.grad(grad_sparse.sum(), sparse_ys[0], allow_unused=True)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(bnas_fast.arch_batch_norm(x, torch.zeros(6, dtype=torch.long)).pow(3).sum(), x,
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="arch_batch_norm: cannot differentiate twice"):
        torch.autograd.grad(grad_x.sum(), x, allow_unused=True)
