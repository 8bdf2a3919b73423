"""The Triton arch_batch_norm / channel_affine kernels against bnas_fast.reference, run by Triton's
interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before triton is imported).

The interpreter runs each program in Python, so the shapes are small.
"""

import pytest

pytest.importorskip("triton")

import torch

from bnas_fast import reference
from bnas_fast.triton import arch_batch_norm as triton_bn

# float32: the kernels and the reference sum in different orders (blocks of the row vs torch's
# reductions) over at most a few hundred values of size ~1 to 5. bfloat16: one rounding of the
# output, and the interpreter's float32 -> bfloat16 cast truncates (2^-7 relative).
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}

# (x shape, group_size, S): a 2-D input (L = 1), a 3-D input, an odd 4-D shape with ghost batches,
# one architecture, and a row longer than one block of BLOCK = 1024 elements (two loop steps).
CASES = [((6, 5), 6, 4), ((6, 4, 7), 3, 2), ((6, 3, 5, 7), 2, 4), ((4, 2, 3, 3), 4, 1), ((4, 2, 33, 33), 2, 3)]


def case_id(case):
    shape, group, S = case
    return f"{'x'.join(map(str, shape))}-g{group}-S{S}"


def make_inputs(shape, S, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    x = (2 * torch.randn(shape, generator=gen) + 0.5).to(dtype)
    arch = torch.randint(0, S, (B,), generator=gen)
    weight = (1 + 0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    return x, arch, weight, bias, grad_y


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_and_backward_match_reference(case, dtype):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, dtype)
    got = triton_bn.arch_batch_norm(x, arch, weight, bias, group, 1e-5)
    expected = reference.arch_batch_norm(x, arch, weight, bias, group, 1e-5)
    for name, a, e in zip(("y", "mean", "invstd", "row_mean", "row_m2"), got, expected):
        assert_close(a, e, dtype, name)
    mean, invstd = expected[1], expected[2]
    got = triton_bn.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group)
    expected = reference.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group)
    tol_scale = max(1.0, (shape[0] * x[0, 0].numel()) ** 0.5)  # sums of up to N terms
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * tol_scale, msg=lambda m, n=name: f"{n}: {m}")


def test_bfloat16_accumulates_in_float32():
    x, arch, weight, bias, grad_y = make_inputs((6, 3, 4, 4), 3, torch.bfloat16)
    got = triton_bn.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
    expected = reference.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
    assert got[1].dtype == torch.float32 and got[0].dtype == torch.bfloat16
    for name, a, e in zip(("y", "mean", "invstd"), got, expected):
        assert_close(a, e, torch.bfloat16, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_affine_and_backward_match_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 7, generator=gen).to(dtype)
    scale, shift = torch.randn(5, 3, generator=gen).to(dtype), torch.randn(5, 3, generator=gen).to(dtype)
    g = torch.randn(5, 3, 4, 7, generator=gen).to(dtype)
    assert_close(triton_bn.channel_affine(x, scale, shift), reference.channel_affine(x, scale, shift), dtype, "y")
    got = triton_bn.channel_affine_backward(g, x, scale)
    for name, a, e in zip(("grad_x", "grad_scale", "grad_shift"), got, reference.channel_affine_backward(g, x, scale)):
        assert_close(a, e, dtype, name)


def test_strided_input_is_read_correctly():
    """The launchers make x contiguous: a channels-last or sliced view gives the same result."""
    x, arch, weight, bias, _ = make_inputs((4, 6, 5, 5), 2, torch.float32)
    sliced = x[:, ::2]
    got = triton_bn.arch_batch_norm(sliced, arch, weight[:, ::2].contiguous(), bias[:, ::2].contiguous(), 2, 1e-5)[0]
    expected = reference.arch_batch_norm(sliced, arch, weight[:, ::2], bias[:, ::2], 2, 1e-5)[0]
    assert_close(got, expected, torch.float32, "y")
