"""Tests of architecture-conditional batch norm (bnas_fast.arch_batch_norm, channel_affine, ArchBatchNorm*d).

The ladder, as for every op:
 1. parity of the C++ kernels (forward and backward) with bnas_fast.reference, over dtypes, shapes,
    statistics groups, numbers of architectures and memory layouts; the reference itself against
    torch.nn.functional.batch_norm and against autograd of its own forward;
 2. float64 gradcheck of both hand-written backwards;
 3. torch.library.opcheck;
 4. torch.compile(fullgraph=True) of a small model built on the module;
 5. determinism across thread counts;
 6. the modules: drop-in parity with nn.BatchNorm1d/2d (train and eval, momentum and None), loading a
    BatchNorm state_dict, per-architecture running statistics;
 7. bad input: a clear error naming the argument;
 8. the channels-last layout: parity, output layouts, gradcheck, opcheck, eval mode and determinism
    of the native NHWC kernels.
The Triton kernels are tested under the interpreter in tests/test_arch_batch_norm_triton.py.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnas_fast
from bnas_fast import reference
from _threads import num_threads
from _tolerance import assert_within

# |kernel - reference| <= atol + rtol |reference|. float32: both sides accumulate per row then per
# group in float32 with different orders (lanes of 16 vs torch's pairwise sums), errors ~ sqrt(N) ulp
# of values ~ 1 to 5 (normalised outputs, gradients). bfloat16/float16 round the output once.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 2e-2},
    torch.float16: {"rtol": 2**-10, "atol": 4e-3},
}
DTYPES = tuple(TOLERANCES)

# (x shape, group_size, S): a 2-D input (L = 1), a 3-D input, odd 4-D shapes, ghost batches, S = 1,
# many architectures (some absent from the batch), a row length that is not a multiple of 16.
CASES = [
    ((8, 5), 8, 3),
    ((6, 4, 7), 3, 2),
    ((10, 3, 5, 7), 10, 4),
    ((12, 6, 4, 4), 4, 1),
    ((9, 2, 3, 3), 3, 50),
    ((4, 16, 17, 1), 2, 5),
]


def _case_id(case) -> str:
    shape, group, S = case
    return f"{'x'.join(map(str, shape))}-g{group}-S{S}"


def make_inputs(shape, S, dtype, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    if layout == "channels_last" and len(shape) == 4:
        x = (2 * torch.randn(shape, generator=gen) + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = (2 * torch.randn((B, 2 * C) + tuple(shape[2:]), generator=gen) + 0.5).to(dtype)[:, ::2]
    else:
        x = (2 * torch.randn(shape, generator=gen) + 0.5).to(dtype)
    arch = torch.randint(0, S, (B,), generator=gen)
    weight = (1 + 0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    return x, arch, weight, bias, grad_y


def test_cpu_backend_is_the_cpp_extension():
    if bnas_fast._backend.forced_backend() == "reference":
        pytest.skip("BNAS_FAST_BACKEND=reference forces the reference backend")
    assert bnas_fast.backends()["cpu"] == "cpp"


# ---------------------------------------------------------------------------------------------
# 1. Parity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(case, dtype):
    shape, group, S = case
    layout = ("contiguous", "sliced", "channels_last")[CASES.index(case) % 3]
    x, arch, weight, bias, _ = make_inputs(shape, S, dtype, layout=layout)
    _check_forward(x, arch, weight, bias, group, dtype)


def _check_forward(x, arch, weight, bias, group, dtype):
    """The op's five forward outputs against the reference's (dtypes and values)."""
    got = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, group, 1e-5)
    expected = reference.arch_batch_norm(x, arch, weight, bias, group, 1e-5)
    tol = TOLERANCES[dtype]
    for name, a, e in zip(("y", "mean", "invstd", "row_mean", "row_m2"), got, expected):
        assert a.dtype == e.dtype, name
        assert_within(a, e, tol if name == "y" else TOLERANCES.get(a.dtype, tol), name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference_autograd(case, dtype):
    """The op's autograd (C++ backward) against autograd through the reference forward (float64 oracle)."""
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = torch.ops.bnas_fast.arch_batch_norm(leaves[0], arch, leaves[1], leaves[2], group, 1e-5)[0]
    got = torch.autograd.grad(y, leaves, grad_y)
    oracle = [t.double().requires_grad_() for t in (x, weight, bias)]
    y_ref = reference.arch_batch_norm(oracle[0], arch, oracle[1], oracle[2], group, 1e-5)[0]
    expected = torch.autograd.grad(y_ref, oracle, grad_y.double())
    # Gradients are sums of up to N terms of size ~|grad_y|: loosen the absolute tolerance with N.
    n = shape[0] * (x[0, 0].numel())
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = tol["atol"] * max(1.0, n**0.5) if dtype != torch.float64 else 1e-9
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, expected):
        assert a.dtype == dtype, name
        assert_within(a.double(), e, tol, name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_op_matches_reference_backward(case):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, torch.float64)
    _, mean, invstd, _, _ = reference.arch_batch_norm(x, arch, weight, bias, group, 1e-5)
    got = torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group)
    expected = reference.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group)
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, expected):
        assert_within(a, e, TOLERANCES[torch.float64], name)


@pytest.mark.parametrize("case", CASES[:3], ids=_case_id)
def test_reference_backward_matches_its_autograd(case):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = reference.arch_batch_norm(leaves[0], arch, leaves[1], leaves[2], group, 1e-5)
    expected = torch.autograd.grad(out[0], leaves, grad_y)
    got = reference.arch_batch_norm_backward(grad_y, x, arch, weight, out[1].detach(), out[2].detach(), group)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 5), (6, 4, 3), (6, 3, 4, 6)], ids=str)
def test_reference_is_batch_norm_with_gathered_affine(shape):
    x, arch, weight, bias, _ = make_inputs(shape, 3, torch.float64)
    y = reference.arch_batch_norm(x, arch, weight, bias, shape[0], 1e-5)[0]
    expand = (slice(None), slice(None)) + (None,) * (len(shape) - 2)
    expected = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5) * weight[arch][expand] + bias[arch][expand]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # ghost batches: each group of 2 normalised on its own
    groups = reference.arch_batch_norm(x, arch, weight, bias, 2, 1e-5)[0]
    for k in range(0, shape[0], 2):
        part = slice(k, k + 2)
        expected = F.batch_norm(x[part], None, None, None, None, True, 0.1, 1e-5)
        expected = expected * weight[arch[part]][expand] + bias[arch[part]][expand]
        torch.testing.assert_close(groups[part], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_affine_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 7, generator=gen).to(dtype)
    scale, shift = torch.randn(5, 3, generator=gen).to(dtype), torch.randn(5, 3, generator=gen).to(dtype)
    g = torch.randn(5, 3, 4, 7, generator=gen).to(dtype)
    assert_within(bnas_fast.channel_affine(x, scale, shift), reference.channel_affine(x, scale, shift), TOLERANCES[dtype])
    got = torch.ops.bnas_fast.channel_affine_backward(g, x, scale)
    for a, e in zip(got, reference.channel_affine_backward(g, x, scale)):
        assert_within(a, e, {"rtol": TOLERANCES[dtype]["rtol"], "atol": 1e-4 if dtype == torch.float32 else 1e-10})


def test_large_offset_keeps_variance_accurate():
    """Rows at mean 1e4 with unit spread: a sum-of-squares formula would lose the variance in float32."""
    gen = torch.Generator().manual_seed(4)
    x = 1e4 + torch.randn(16, 3, 8, 8, generator=gen)
    arch = torch.zeros(16, dtype=torch.long)
    w, b = torch.ones(1, 3), torch.zeros(1, 3)
    _, mean, invstd, _, _ = torch.ops.bnas_fast.arch_batch_norm(x, arch, w, b, 16, 1e-5)
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd[0].double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)


def _float64_truth(x, arch, g, w, b):
    """Forward and backward of the reference in float64 from the same float32 values."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference.arch_batch_norm(x64, arch, w64, b.double(), x.shape[0], 1e-5)[0]
    y64.backward(g.double())
    return y64, x64.grad, w64.grad


def test_a_million_rows_at_a_large_mean_keep_float32_accuracy():
    """x [1e6, 1] at mean 1e4: summing the rows' statistics one at a time in float32 put the mean 130
    off and y up to 5.8 off; the kernel now adds blocks in double and normalises x - mean."""
    gen = torch.Generator().manual_seed(7)
    B = 1_000_000
    x = (1e4 + torch.randn(B, 1, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(B, 1, generator=gen, dtype=torch.float64).float()
    arch = torch.zeros(B, dtype=torch.long)
    w, b = torch.ones(1, 1), torch.zeros(1, 1)
    y64, gx64, gw64 = _float64_truth(x, arch, g, w, b)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = bnas_fast.arch_batch_norm(xk, arch, wk, b)
    y.backward(g)
    # float32 torch reaches ~1e-3 on y here (x itself is rounded to 1e-3 at 1e4)
    assert float((y.double() - y64).abs().max()) < 2e-3
    assert float((xk.grad.double() - gx64).abs().max()) < 2e-3 * float(gx64.abs().max())
    torch.testing.assert_close(wk.grad.double(), gw64, rtol=1e-4, atol=0)


@pytest.mark.parametrize("x_mean", [0.0, 1e4])
def test_a_large_mean_of_the_gradient(x_mean):
    """grad_y at mean 1e3, over two rows of 1e6 values. float32 x - mean has the same rounding error
    for every x of a binade (x is on the float grid), a bias that the gradient's mean summed to 0.7%
    of grad_weight; rounding the mean itself to float32 adds sum(g) times that rounding. The kernel
    sums in double and subtracts the mean's residual sum(x - mean) / N: grad_weight comes out within
    1e-7 relative (float32 torch.nn.functional.batch_norm: 2% at x_mean = 0, and 1e5 times the
    gradient's size on grad_x at x_mean = 1e4)."""
    gen = torch.Generator().manual_seed(8)
    x = (x_mean + torch.randn(2, 1, 1_000_000, generator=gen, dtype=torch.float64)).float()
    g = (1e3 + torch.randn(2, 1, 1_000_000, generator=gen, dtype=torch.float64)).float()
    arch = torch.zeros(2, dtype=torch.long)
    w, b = torch.ones(1, 1), torch.zeros(1, 1)
    y64, gx64, gw64 = _float64_truth(x, arch, g, w, b)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    bnas_fast.arch_batch_norm(xk, arch, wk, b).backward(g)
    xt, wt = x.clone().requires_grad_(), w[0].clone().requires_grad_()
    F.batch_norm(xt, None, None, wt, b[0], training=True).backward(g)
    ours_w, torch_w = float((wk.grad.double() - gw64).abs().max()), float((wt.grad.double() - gw64).abs().max())
    ours_x, torch_x = float((xk.grad.double() - gx64).abs().max()), float((xt.grad.double() - gx64).abs().max())
    assert ours_w < 1e-6 * float(gw64.abs().max()) and ours_w < torch_w, (ours_w, torch_w)
    assert ours_x < 1e-4 * float(gx64.abs().max()) and ours_x < torch_x, (ours_x, torch_x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_arch_running_variance_at_a_large_mean(dtype):
    """Mean 1e4 (float32) or 1e8 (float64) with unit spread: through E[x^2] - mean^2 the running
    variance cancelled to 0; the mixture formula keeps it."""
    mean = 1e4 if dtype == torch.float32 else 1e8
    gen = torch.Generator().manual_seed(9)
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch", momentum=0.1).to(dtype)
    bn.running_mean.fill_(mean)  # start from the right mean, as after some batches
    for _ in range(60):
        x = (mean + torch.randn(12, 2, 4, 4, generator=gen, dtype=torch.float64)).to(dtype)
        bn(x, torch.arange(12) % 3)
    # running_var started at 1 and has seen ~1: it must stay near 1 (the variance of x)
    assert ((bn.running_var - 1.0).abs() < 0.15).all(), bn.running_var


def test_empty_batch_gives_an_empty_output_and_channel_affine_is_fine():
    x = torch.randn(0, 3, 4, 4)
    y = bnas_fast.arch_batch_norm(x, torch.zeros(0, dtype=torch.long), torch.ones(1, 3), torch.zeros(1, 3))
    assert y.shape == x.shape  # as torch.nn.functional.batch_norm
    with pytest.raises(ValueError, match="value per channel"):  # one value per channel is still rejected
        bnas_fast.arch_batch_norm(torch.randn(1, 3), torch.zeros(1, dtype=torch.long))
    assert bnas_fast.channel_affine(x, torch.ones(0, 3), torch.zeros(0, 3)).shape == x.shape


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (5, 3, 0, 4)])
def test_reference_handles_empty_inputs_as_the_kernels_do(shape):
    """BNAS_FAST_BACKEND=reference serves these: an empty x (B = 0 or an empty spatial size) must
    give the op's empty result, not a reshape error."""
    x = torch.randn(shape, dtype=torch.float64)
    B, C = shape[:2]
    scale, shift = torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, dtype=torch.float64)
    y = reference.channel_affine(x, scale, shift)
    assert y.shape == x.shape and torch.equal(y, torch.ops.bnas_fast.channel_affine(x, scale, shift))
    grad_x, grad_scale, grad_shift = reference.channel_affine_backward(torch.ones_like(x), x, scale)
    assert grad_x.shape == x.shape and torch.equal(grad_scale, torch.zeros(B, C, dtype=torch.float64))
    assert torch.equal(grad_shift, torch.zeros(B, C, dtype=torch.float64))
    arch, w = torch.zeros(B, dtype=torch.long), torch.ones(2, C, dtype=torch.float64)
    for running in ((torch.zeros(C), torch.ones(C)), (torch.zeros(2, C), torch.ones(2, C))):
        rm, rv = (r.double() for r in running)
        y = reference.arch_batch_norm_eval(x, arch, w, torch.zeros_like(w), rm, rv, 1e-5)
        expected = bnas_fast.arch_batch_norm(x, arch, w, torch.zeros_like(w), rm, rv, training=False)
        assert y.shape == x.shape and torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------
# 2. gradcheck (float64)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [((6, 3, 5), 3, 4), ((4, 2), 4, 2), ((4, 2, 3, 2), 2, 1)], ids=_case_id)
def test_arch_batch_norm_gradcheck(case):
    shape, group, S = case
    x, arch, weight, bias, _ = make_inputs(shape, S, torch.float64, seed=5)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))

    def fn(x, w, b):
        return torch.ops.bnas_fast.arch_batch_norm(x, arch, w, b, group, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs)


def test_channel_affine_gradcheck():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    shift = torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.bnas_fast.channel_affine, (x, scale, shift))


def test_eval_mode_gradcheck_through_running_statistics_folding():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    arch = torch.tensor([0, 2, 1, 2, 0])
    w = torch.randn(3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    rm, rv = torch.randn(3, 3, dtype=torch.float64, generator=gen), torch.rand(3, 3, dtype=torch.float64, generator=gen) + 0.5

    def fn(x, w, b):
        return bnas_fast.arch_batch_norm(x, arch, w, b, rm, rv, training=False)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    torch.testing.assert_close(fn(x, w, b), reference.arch_batch_norm_eval(x, arch, w, b, rm, rv, 1e-5))


# ---------------------------------------------------------------------------------------------
# 3. opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES[:4], ids=_case_id)
def test_opcheck_arch_batch_norm(case):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, torch.float32)
    torch.library.opcheck(torch.ops.bnas_fast.arch_batch_norm.default, (x, arch, weight, bias, group, 1e-5))
    args = (x.requires_grad_(), arch, weight.requires_grad_(), bias.requires_grad_(), group, 1e-5)
    torch.library.opcheck(torch.ops.bnas_fast.arch_batch_norm.default, args)
    _, mean, invstd, _, _ = reference.arch_batch_norm(x.detach(), arch, weight.detach(), bias.detach(), group, 1e-5)
    torch.library.opcheck(
        torch.ops.bnas_fast.arch_batch_norm_backward.default,
        (grad_y, x.detach(), arch, weight.detach(), mean, invstd, group),
    )


def test_opcheck_channel_affine():
    x = torch.randn(4, 3, 5, requires_grad=True)
    scale, shift = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.bnas_fast.channel_affine.default, (x, scale, shift))
    torch.library.opcheck(
        torch.ops.bnas_fast.channel_affine_backward.default, (torch.randn(4, 3, 5), x.detach(), scale.detach())
    )


# ---------------------------------------------------------------------------------------------
# 4. torch.compile
# ---------------------------------------------------------------------------------------------
class _TinyNSA(nn.Module):
    """conv -> arch-conditional BN -> ReLU -> pool -> linear: enough to exercise train and eval."""

    def __init__(self, num_archs: int, running_stats: str):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = bnas_fast.nn.ArchBatchNorm2d(4, num_archs, running_stats=running_stats)
        self.head = nn.Linear(4, 3)

    def forward(self, x, arch):
        h = torch.relu(self.bn(self.conv(x), arch))
        return self.head(h.mean((2, 3)))


COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("running_stats", ["shared", "per_arch"])
def test_compile_fullgraph_matches_eager(backend, running_stats):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _TinyNSA(3, running_stats)
    compiled_model = _TinyNSA(3, running_stats)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(6, 2, 5, 5, generator=gen)
        arch = torch.randint(0, 3, (6,), generator=gen)
        out_e, out_c = eager(x, arch), compiled(x, arch)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        grads_e = torch.autograd.grad(out_e.square().sum(), list(eager.parameters()))
        grads_c = torch.autograd.grad(out_c.square().sum(), list(compiled_model.parameters()))
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_model.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x, arch), eager(x, arch), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, num_archs, group_size, layout",
    [
        ((64, 8, 9, 9), 7, 16, "contiguous"),
        # channels-last: several tasks per example (C = 96: 2 parts of an example's rows) and a
        # small batch; the split and every sum order depend on the shape, not on the thread count
        ((3, 96, 20, 20), 2, 3, "channels_last"),
    ],
    ids=["contiguous", "channels_last"],
)
def test_deterministic_across_thread_counts(shape, num_archs, group_size, layout):
    x, arch, weight, bias, grad_y = make_inputs(shape, num_archs, torch.float32, layout=layout)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]

    def run():
        y = torch.ops.bnas_fast.arch_batch_norm(leaves[0], arch, leaves[1], leaves[2], group_size, 1e-5)[0]
        return [y.detach()] + list(torch.autograd.grad(y, leaves, grad_y))

    first = run()
    for threads in (1, 2):
        with num_threads(threads):
            for a, b in zip(first, run()):
                assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 6. Modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (bnas_fast.nn.ArchBatchNorm2d, nn.BatchNorm2d, (8, 5, 6, 6)),
        (bnas_fast.nn.ArchBatchNorm1d, nn.BatchNorm1d, (8, 5)),
        (bnas_fast.nn.ArchBatchNorm1d, nn.BatchNorm1d, (8, 5, 7)),
    ],
    ids=["2d", "1d", "1d-seq"],
)
def test_one_architecture_is_a_drop_in_for_batch_norm(ours, theirs, shape, momentum):
    torch.manual_seed(0)
    ref = theirs(5, momentum=momentum)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = ours(5, momentum=momentum)
    mine.load_state_dict(ref.state_dict())
    assert mine.weight.shape == (1, 5)
    for _ in range(3):
        x = torch.randn(shape, requires_grad=True)
        y_ref, y = ref(x), mine(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn(shape)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, [x, ref.weight], g)
        gx, gw = torch.autograd.grad(y, [x, mine.weight], g)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw[0], gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine.running_mean, ref.running_mean)
    torch.testing.assert_close(mine.running_var, ref.running_var)
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ref.eval()
    mine.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_without_running_stats_uses_batch_statistics_in_eval_too():
    ref, mine = nn.BatchNorm2d(3, track_running_stats=False), bnas_fast.nn.ArchBatchNorm2d(3, track_running_stats=False)
    ref.eval()
    mine.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    assert mine.running_mean is None


def test_per_arch_running_variance_pools_examples_across_batches():
    """One example of the architecture per batch (S = 50, B = 64 gives about one): the variance
    within each example's feature map is small, but the running variance must be the variance over
    all the architecture's examples, between-example spread included."""
    torch.manual_seed(0)
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch", momentum=None)
    levels = torch.randn(400, 2) * 2.0  # each example's own level per channel: variance 4 between examples
    for b in range(400):
        x = torch.stack([levels[b][:, None, None] + 0.1 * torch.randn(2, 3, 3), torch.randn(2, 3, 3)])
        bn(x, torch.tensor([0, 1]))
    total = levels.var(0) + 0.01
    torch.testing.assert_close(bn.running_mean[0], levels.mean(0), rtol=0, atol=0.01)  # plus the noise mean, ~0.002
    assert ((bn.running_var[0] - total).abs() <= 0.02 * total).all(), (bn.running_var[0], total)


def test_per_arch_running_statistics_use_only_their_examples():
    torch.manual_seed(1)
    bn = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=4, running_stats="per_arch", momentum=0.5)
    x = torch.randn(7, 3, 4, 4) * 2 + 1
    arch = torch.tensor([0, 0, 1, 1, 1, 3, 3])  # architecture 2 is absent
    bn(x, arch)
    for s in (0, 1, 3):
        xs = x[arch == s]
        mean = xs.mean((0, 2, 3))
        var = xs.transpose(0, 1).reshape(3, -1).var(1)  # unbiased, as nn.BatchNorm's running_var
        torch.testing.assert_close(bn.running_mean[s], 0.5 * mean, rtol=1e-5, atol=1e-6)
        # the second moment is averaged: 0.5 (1 + 0^2) + 0.5 (var + mean^2), minus the new mean squared
        torch.testing.assert_close(bn.running_var[s], 0.5 + 0.5 * var + 0.25 * mean**2, rtol=1e-5, atol=1e-6)
    assert torch.equal(bn.running_mean[2], torch.zeros(3)) and torch.equal(bn.running_var[2], torch.ones(3))
    assert bn.num_batches_tracked.tolist() == [1, 1, 0, 1]
    # eval: each example normalised with its own architecture's statistics
    bn.eval()
    y = bn(x, arch)
    rm, rv = bn.running_mean[arch][:, :, None, None], bn.running_var[arch][:, :, None, None]
    expected = (x - rm) / torch.sqrt(rv + bn.eps) * bn.weight[arch][:, :, None, None] + bn.bias[arch][:, :, None, None]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_per_arch_cumulative_average_counts_batches_per_architecture():
    bn = bnas_fast.nn.ArchBatchNorm1d(2, num_archs=2, running_stats="per_arch", momentum=None)
    batches = [torch.randn(6, 2) for _ in range(3)]
    archs = [torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0] * 6), torch.tensor([0, 0, 1, 1, 0, 1])]
    for x, a in zip(batches, archs):
        bn(x, a)
    # architecture 1 was in batches 0 and 2: its running mean is the plain average of those two batch means
    means = [x[a == 1].mean(0) for x, a in zip(batches, archs) if bool((a == 1).any())]
    torch.testing.assert_close(bn.running_mean[1], sum(means) / len(means), rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.tolist() == [3, 2]


class _TwoNorms(nn.Module):
    """nn.BatchNorm2d then ArchBatchNorm2d (per-architecture statistics): calibration must reach both."""

    def __init__(self):
        super().__init__()
        self.plain = nn.BatchNorm2d(3, momentum=0.3)
        self.conditional = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=4, running_stats="per_arch")

    def forward(self, x, arch):
        return self.conditional(self.plain(x) * 2 + 1, arch)


def test_recalibrate_batch_norm_averages_the_batches_statistics_and_restores_the_model():
    torch.manual_seed(3)
    model = _TwoNorms()
    for _ in range(5):  # stale statistics from "training" on other data
        model(torch.randn(8, 3, 4, 4) * 5 - 2, torch.randint(0, 4, (8,)))
    model.eval()
    batches = [torch.randn(6, 3, 4, 4) * (1 + i) + i for i in range(3)]
    arch = torch.full((6,), 2, dtype=torch.long)
    assert bnas_fast.nn.recalibrate_batch_norm(model, [(x, arch) for x in batches]) == 3
    # nn.BatchNorm2d: equal-weight average of the batch means and of the unbiased batch variances
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])
    variances = torch.stack([x.transpose(0, 1).reshape(3, -1).var(1) for x in batches])
    torch.testing.assert_close(model.plain.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.plain.running_var, variances.mean(0), rtol=1e-5, atol=1e-5)
    assert int(model.plain.num_batches_tracked) == 3
    # per-architecture statistics: only architecture 2 ran, the other rows are back at their reset values
    assert model.conditional.num_batches_tracked.tolist() == [0, 0, 3, 0]
    for s in (0, 1, 3):
        assert torch.equal(model.conditional.running_mean[s], torch.zeros(3))
        assert torch.equal(model.conditional.running_var[s], torch.ones(3))
    assert not torch.equal(model.conditional.running_mean[2], torch.zeros(3))
    # momentum and eval mode restored
    assert model.plain.momentum == 0.3 and model.conditional.momentum == 0.1 and not model.training


def test_recalibrated_eval_mode_matches_batch_statistics_on_the_calibration_batch():
    """With one large calibration batch, eval mode afterwards normalises it as train mode did (up to
    the unbiased variance's n / (n - 1))."""
    torch.manual_seed(4)
    bn = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=2, running_stats="per_arch", momentum=0.1)
    x, arch = torch.randn(64, 3, 8, 8) * 3 + 1, torch.ones(64, dtype=torch.long)
    expected = bn(x, arch)  # train mode: batch statistics
    bnas_fast.nn.recalibrate_batch_norm(bn, [(x, arch)])
    bn.eval()
    torch.testing.assert_close(bn(x, arch), expected, rtol=1e-3, atol=1e-3)


def test_recalibrate_batch_norm_bad_input():
    with pytest.raises(ValueError, match="no batch norm layer with running statistics"):
        bnas_fast.nn.recalibrate_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(3, 2)])
    model = nn.BatchNorm1d(2, momentum=0.2)
    with pytest.raises(ValueError, match="batches is empty"):
        bnas_fast.nn.recalibrate_batch_norm(model, [])
    assert model.momentum == 0.2 and model.training  # restored even so


def test_state_dict_broadcast_into_many_architectures_and_round_trip():
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.copy_(torch.arange(4.0))
        ref.running_mean.fill_(0.25)
    bn = bnas_fast.nn.ArchBatchNorm2d(4, num_archs=3, running_stats="per_arch")
    bn.load_state_dict(ref.state_dict())
    assert torch.equal(bn.weight, torch.arange(4.0).expand(3, 4))
    assert torch.equal(bn.running_mean, torch.full((3, 4), 0.25))
    other = bnas_fast.nn.ArchBatchNorm2d(4, num_archs=3, running_stats="per_arch")
    other.load_state_dict(bn.state_dict())
    assert torch.equal(other.weight, bn.weight)


def test_group_statistics_in_the_module():
    bn = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=2, group_size=4)
    x, arch = torch.randn(8, 3, 5, 5), torch.tensor([0, 1] * 4)
    y = bn(x, arch)
    expected = torch.cat([F.batch_norm(x[k : k + 4], None, None, None, None, True) for k in (0, 4)])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # running statistics over the whole batch
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_bench_cases_are_registered_and_agree():
    from bnas_fast.bench import all_cases
    from bnas_fast.bench import arch_batch_norm as cases_module

    names = {c.name for c in all_cases()}
    assert {c.name for c in cases_module.cases()} <= names
    # the providers compute the same thing (on a small shape: the module's eager function vs the op)
    x, arch, weight, bias, _ = make_inputs((6, 3, 4, 4), 5, torch.float32)
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    y1 = cases_module.eager_arch_batch_norm(x, arch, weight, bias, rm1, rv1)
    y2 = bnas_fast.arch_batch_norm(x, arch, weight, bias, rm2, rv2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm2, rm1)
    torch.testing.assert_close(rv2, rv1)


# ---------------------------------------------------------------------------------------------
# 7. Bad input
# ---------------------------------------------------------------------------------------------
_f = bnas_fast.arch_batch_norm
_op = torch.ops.bnas_fast.arch_batch_norm


def _x(b=4, c=3):
    return torch.randn(b, c, 3, 3)


def _a(b=4, s=2):
    return torch.arange(b) % s


def _w(s=2, c=3, dtype=torch.float32):
    return torch.ones(s, c, dtype=dtype)


BAD_CALLS = {
    "arch_out_of_range": (lambda: _f(_x(), torch.tensor([0, 1, 2, 0]), _w(), _w()), IndexError, r"arch.*2.*out of range"),
    "arch_negative": (lambda: _f(_x(), torch.tensor([0, -1, 1, 0]), _w(), _w()), IndexError, r"arch.*-1"),
    "op_arch_out_of_range": (lambda: _op(_x(), torch.tensor([0, 1, 5, 0]), _w(), _w(), 4, 1e-5), IndexError, r"arch\[2\] = 5"),
    "op_bwd_arch_out_of_range": (
        lambda: torch.ops.bnas_fast.arch_batch_norm_backward(
            _x(), _x(), torch.tensor([0, 1, 5, 0]), _w(), torch.zeros(1, 3), torch.ones(1, 3), 4
        ),
        IndexError,
        r"arch\[2\] = 5",
    ),
    "eval_arch_out_of_range": (
        lambda: _f(_x(), torch.tensor([0, 1, 2, 0]), _w(), _w(), torch.zeros(3), torch.ones(3), training=False),
        IndexError,
        r"arch",
    ),
    "arch_int32": (lambda: _f(_x(), _a().int(), _w(), _w()), ValueError, r"arch must be a \[B\] = \[4\] int64"),
    "arch_wrong_length": (lambda: _f(_x(), _a(3), _w(), _w()), ValueError, r"arch must be a \[B\]"),
    "arch_float": (lambda: _f(_x(), _a().float(), _w(), _w()), ValueError, r"arch.*int64"),
    "weight_wrong_channels": (lambda: _f(_x(), _a(), _w(c=4), _w()), ValueError, r"weight must have shape \[S, C\] with C = 3"),
    "weight_bias_disagree_on_S": (lambda: _f(_x(), _a(), _w(s=2), _w(s=3)), ValueError, r"weight has S = 2.*bias has 3"),
    "weight_dtype": (lambda: _f(_x(), _a(), _w(dtype=torch.float64), _w()), TypeError, r"weight has dtype"),
    "running_mean_wrong_shape": (
        lambda: _f(_x(), _a(), _w(), _w(), torch.zeros(4), torch.ones(4)),
        ValueError,
        r"running_mean must be \[C\] = \[3\]",
    ),
    "running_stats_wrong_S": (
        lambda: _f(_x(), _a(), _w(), _w(), torch.zeros(5, 3), torch.ones(5, 3)),
        ValueError,
        r"running_mean must be .*\[S, C\] = \[2, 3\]",
    ),
    "running_var_missing": (lambda: _f(_x(), _a(), _w(), _w(), torch.zeros(3), None), ValueError, r"running_mean and running_var"),
    "eval_without_running_stats": (lambda: _f(_x(), _a(), _w(), _w(), training=False), ValueError, r"eval mode.*running_mean"),
    "one_example_per_group": (lambda: _f(_x(), _a(), _w(), _w(), group_size=1), ValueError, r"group_size = 1.*one example per statistics group"),
    "group_not_dividing": (lambda: _f(_x(), _a(), _w(), _w(), group_size=3), ValueError, r"group_size must .* divide"),
    "single_value_per_channel": (lambda: _f(torch.randn(1, 3), _a(1), _w(), _w()), ValueError, r"more than 1 value per channel"),
    "op_single_value_per_channel": (lambda: _op(torch.randn(1, 3), _a(1), _w(), _w(), 1, 1e-5), ValueError, r"at least 2"),
    "negative_eps": (lambda: _f(_x(), _a(), _w(), _w(), eps=-1.0), ValueError, r"eps must be"),
    "nan_eps": (lambda: _f(_x(), _a(), _w(), _w(), eps=float("nan")), ValueError, r"eps must be"),
    "momentum_out_of_range": (
        lambda: _f(_x(), _a(), _w(), _w(), torch.zeros(3), torch.ones(3), momentum=1.5),
        ValueError,
        r"momentum must be",
    ),
    # an empty x (no channels) runs no kernel, which is where arch is checked: checked up front instead
    "arch_out_of_range_empty_x": (
        lambda: _f(torch.randn(4, 0, 5), torch.full((4,), 7), torch.ones(2, 0), torch.zeros(2, 0)),
        IndexError,
        r"arch holds 7, out of range for S architectures = 2",
    ),
    "x_1d": (lambda: _f(torch.randn(4), _a(), _w(), _w()), ValueError, r"x must have shape \[B, C, \*\]"),
    "x_int": (lambda: _f(torch.ones(4, 3, dtype=torch.long), _a(), _w(), _w()), TypeError, r"x must be a floating-point"),
    "x_not_tensor": (lambda: _f([[1.0]], _a(1), _w(), _w()), TypeError, r"x must be a torch.Tensor"),
    "affine_scale_wrong_shape": (
        lambda: bnas_fast.channel_affine(_x(), torch.ones(4, 2), torch.zeros(4, 3)),
        ValueError,
        r"scale must be \[B, C\] = \[4, 3\]",
    ),
    "affine_shift_dtype": (
        lambda: bnas_fast.channel_affine(_x(), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.float64)),
        ValueError,
        r"shift must be",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_naming_the_argument(name):
    call, exc_type, pattern = BAD_CALLS[name]
    with pytest.raises(exc_type, match=pattern) as info:
        call()
    assert type(info.value) is exc_type
    assert "arch_batch_norm" in str(info.value) or "channel_affine" in str(info.value)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, num_archs=0), r"num_archs must be an int >= 1"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, running_stats="per_example"), r"running_stats must be one of"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, momentum=-0.1), r"momentum must be in \[0, 1\]"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, group_size=1), r"group_size must be None .* >= 2"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, eps=float("inf")), r"eps must be a finite number >= 0"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, eps=float("nan")), r"eps must be a finite number >= 0"),
        (lambda: bnas_fast.nn.ArchBatchNorm2d(3, eps=-1e-5), r"eps must be a finite number >= 0"),
    ],
)
def test_module_bad_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(momentum="0.1"), r"ArchBatchNorm2d: momentum must be None or a number in \[0, 1\], got '0.1'"),
        (dict(momentum=True), r"ArchBatchNorm2d: momentum must be None or a number"),
        (dict(eps="1e-5"), r"ArchBatchNorm2d: eps must be a finite number >= 0, got '1e-5'"),
        (dict(eps=None), r"ArchBatchNorm2d: eps must be a finite number >= 0"),
    ],
)
def test_module_non_number_momentum_or_eps_names_the_argument(kwargs, pattern):
    with pytest.raises(TypeError, match=pattern):
        bnas_fast.nn.ArchBatchNorm2d(3, **kwargs)


def test_module_needs_arch_with_several_architectures_and_the_right_rank():
    bn = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=2)
    with pytest.raises(ValueError, match="arch is required"):
        bn(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="expected a 4D input"):
        bn(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kwargs", [dict(), dict(track_running_stats=False), dict(running_stats="per_arch")])
def test_module_without_affine_accepts_every_architecture(kwargs):
    """affine=False and shared statistics leave nothing [S, C] in the call: the module passes num_archs."""
    bn = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=4, affine=False, **kwargs)
    x, arch = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 3, 2])
    torch.testing.assert_close(bn(x, arch), F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range for S"):
        bn(x, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="num_archs = 2 but weight"):
        bnas_fast.arch_batch_norm(x, arch, torch.ones(4, 3), None, num_archs=2)


def test_empty_batches_give_empty_outputs_and_leave_the_statistics_alone():
    for shape in [(0, 4, 5, 5), (6, 4, 0, 5)]:
        ours, theirs = bnas_fast.nn.ArchBatchNorm2d(4, num_archs=2), nn.BatchNorm2d(4)
        x = torch.randn(shape, requires_grad=True)
        arch = torch.zeros(shape[0], dtype=torch.long)
        y = ours(x, arch)
        assert y.shape == theirs(x).shape == shape
        y.sum().backward()
        assert x.grad.shape == shape and torch.equal(ours.weight.grad, torch.zeros(2, 4))
        assert torch.equal(ours.running_mean, torch.zeros(4)) and torch.equal(ours.running_var, torch.ones(4))


@pytest.mark.parametrize(
    "arch_momentum, pattern",
    [
        (torch.full((3,), float("nan")), r"arch_momentum must have every value in \[0, 1\]"),
        (torch.full((3,), -0.5), r"arch_momentum must have every value in \[0, 1\]"),
        (torch.full((2,), 0.5), r"arch_momentum must be a floating \[S\] = \[3\] tensor"),
        (torch.ones(3, dtype=torch.long), r"arch_momentum must be a floating"),
        ([0.5, 0.5, 0.5], r"arch_momentum must be a torch.Tensor"),
    ],
)
def test_bad_arch_momentum_names_the_argument(arch_momentum, pattern):
    x, arch = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 0])
    rm, rv = torch.zeros(3, 2), torch.ones(3, 2)
    with pytest.raises((ValueError, TypeError), match=pattern):
        bnas_fast.arch_batch_norm(x, arch, None, None, rm, rv, arch_momentum=arch_momentum)
    assert torch.equal(rm, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="per-architecture \\[S, C\\] running statistics only"):
        bnas_fast.arch_batch_norm(x, arch, None, None, torch.zeros(2), torch.ones(2), arch_momentum=torch.full((3,), 0.5))


@pytest.mark.parametrize("running_stats", ["shared", "per_arch"])
def test_rejected_arch_does_not_advance_the_batch_count(running_stats):
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=2, running_stats=running_stats, momentum=None)
    x = torch.randn(4, 2, 3, 3)
    for bad, error in [(torch.tensor([0, 1, -1, 0]), IndexError), (torch.zeros(4), ValueError), (torch.zeros(1, 4, dtype=torch.long), ValueError)]:
        with pytest.raises(error, match="arch"):
            bn(x, bad)
    assert int(bn.num_batches_tracked.sum()) == 0
    bn(x, torch.tensor([0, 1, 1, 0]))
    assert int(bn.num_batches_tracked.sum()) == (1 if running_stats == "shared" else 2)


# ---------------------------------------------------------------------------------------------
# 8. Channels-last layout
# ---------------------------------------------------------------------------------------------
ops_module = __import__("importlib").import_module("bnas_fast.ops.arch_batch_norm")
CL = torch.channels_last


def _is_channels_last(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _to_layout(t, layout):
    return t.contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)


def _check_against_reference(x, arch, weight, bias, grad_y, group, dtype):
    """Forward outputs and the op's autograd (x, weight, bias) against the reference, with the
    tolerances of the parity tests above; returns (y, grad_x)."""
    _check_forward(x, arch, weight, bias, group, dtype)
    tol = TOLERANCES[dtype]
    leaves = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    y = torch.ops.bnas_fast.arch_batch_norm(leaves[0], arch, leaves[1], leaves[2], group, 1e-5)[0]
    grads = torch.autograd.grad(y, leaves, grad_y)
    oracle = [t.double().requires_grad_() for t in (x, weight, bias)]
    y_ref = reference.arch_batch_norm(oracle[0], arch, oracle[1], oracle[2], group, 1e-5)[0]
    expected = torch.autograd.grad(y_ref, oracle, grad_y.double())
    n = x.shape[0] * x[0, 0].numel()
    gtol = dict(tol)
    gtol["atol"] = gtol["atol"] * max(1.0, n**0.5) if dtype != torch.float64 else 1e-9
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, expected):
        assert a.dtype == dtype, name
        assert_within(a.double(), e, gtol, name)
    return y, grads[0]


# (shape, group_size, S): the brief's small and large shapes with one group and ghost batches, one
# architecture and several
CL_CASES = [
    ((6, 5, 4, 3), 6, 1),
    ((6, 5, 4, 3), 3, 3),
    ((6, 5, 4, 3), 2, 3),
]


@pytest.mark.parametrize("case", CL_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_matches_reference(case, dtype):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, dtype, layout="channels_last")
    assert _is_channels_last(x)
    y, grad_x = _check_against_reference(x, arch, weight, bias, _to_layout(grad_y, "channels_last"), group, dtype)
    assert _is_channels_last(y) and _is_channels_last(grad_x)


@pytest.mark.parametrize("group, S", [(128, 1), (32, 3)], ids=["g128-S1", "g32-S3"])
def test_channels_last_large_float32(group, S):
    x, arch, weight, bias, grad_y = make_inputs((128, 8, 28, 28), S, torch.float32, layout="channels_last")
    y, grad_x = _check_against_reference(x, arch, weight, bias, _to_layout(grad_y, "channels_last"), group, torch.float32)
    assert _is_channels_last(y) and _is_channels_last(grad_x)


# The kernel's internal cases: pieces of k hw rows for C < 64 (C = 3: k = 64, the last piece
# partial), channel counts that are not a multiple of the 64-wide strips (96, 65), pieces wider than a
# strip (128: two strips, the next-block prefetch), several blocks per task (Chan's combination of
# the blocks' M2) and several tasks per example (the per-task partials), a small B.
@pytest.mark.parametrize(
    "shape, group, S",
    [((2, 3, 70, 70), 2, 2), ((4, 96, 20, 20), 2, 3), ((3, 128, 20, 20), 3, 1), ((2, 65, 9, 31), 2, 2), ((4, 16, 17, 1), 2, 5)],
    ids=["C3", "C96-parts", "C128-parts", "C65", "W1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_kernel_paths(shape, group, S, dtype):
    x, arch, weight, bias, grad_y = make_inputs(shape, S, dtype, seed=11, layout="channels_last")
    y, grad_x = _check_against_reference(x, arch, weight, bias, grad_y, group, dtype)
    assert _is_channels_last(y) and _is_channels_last(grad_x)
    # channel_affine: forward and backward sums over the same paths
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(12)
    scale, shift = torch.randn(shape[:2], generator=gen).to(acc), torch.randn(shape[:2], generator=gen).to(acc)
    out = torch.ops.bnas_fast.channel_affine(x, scale, shift)
    assert _is_channels_last(out)
    assert_within(out, reference.channel_affine(x, scale, shift), TOLERANCES[dtype], "channel_affine")
    got = torch.ops.bnas_fast.channel_affine_backward(grad_y, x, scale)
    assert _is_channels_last(got[0])
    L = x[0, 0].numel()
    sum_tol = {"rtol": TOLERANCES[dtype]["rtol"], "atol": (1e-10 if dtype == torch.float64 else 1e-5) * L**0.5}
    for name, a, e, tol in zip(("grad_x", "grad_scale", "grad_shift"), got, reference.channel_affine_backward(grad_y, x, scale),
                               (TOLERANCES[dtype], sum_tol, sum_tol)):
        assert_within(a, e, tol, f"channel_affine {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_agrees_with_contiguous(dtype):
    """The same values in both layouts give the same results up to the order of the sums."""
    x, arch, weight, bias, grad_y = make_inputs((8, 6, 5, 7), 3, dtype, seed=13)
    outs = {}
    for layout in ("contiguous", "channels_last"):
        xl = _to_layout(x, layout).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y = bnas_fast.arch_batch_norm(xl, arch, w, b, group_size=4)
        outs[layout] = [y.detach()] + list(torch.autograd.grad(y, (xl, w, b), _to_layout(grad_y, layout)))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for name, a, e in zip(("y", "grad_x", "grad_weight", "grad_bias"), outs["channels_last"], outs["contiguous"]):
        assert_within(a, e, tol, name)


def test_output_layouts():
    """y and grad_x follow x: channels-last for a channels-last x, contiguous for a contiguous one and
    for the ambiguous layouts (C = 1, H = W = 1: both at once), and for other strides; the small
    outputs are contiguous [G, C] / [B, C] / [S, C] in every case. The registered fake kernels agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        ((4, 3, 5, 5), "channels_last", True),
        ((4, 3, 5, 5), "contiguous", False),
        ((4, 1, 5, 5), "channels_last", False),  # C = 1
        ((4, 3, 1, 1), "channels_last", False),  # H = W = 1
        ((4, 3, 5), "contiguous", False),  # 3-D
    ]
    for shape, layout, cl in cases:
        x, arch, weight, bias, grad_y = make_inputs(shape, 2, torch.float32)
        x = _to_layout(x, layout) if len(shape) == 4 else x
        assert ops_module.output_memory_format(x) == (CL if cl else torch.contiguous_format)
        y, mean, invstd, row_mean, row_m2 = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, 2, 1e-5)
        grad_x, grad_w, grad_b = torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, 2)
        scale = torch.ones(shape[:2])
        z = torch.ops.bnas_fast.channel_affine(x, scale, scale)
        gz = torch.ops.bnas_fast.channel_affine_backward(grad_y, x, scale)
        for name, t in (("y", y), ("grad_x", grad_x), ("channel_affine y", z), ("channel_affine grad_x", gz[0])):
            assert _is_channels_last(t) == cl and (t.is_contiguous() or cl), (shape, layout, name, t.stride())
        for t in (mean, invstd, row_mean, row_m2, grad_w, grad_b, gz[1], gz[2]):
            assert t.is_contiguous()
        with FakeTensorMode() as mode:
            fx, fg = mode.from_tensor(x), mode.from_tensor(grad_y)
            fa, fw, fb = mode.from_tensor(arch), mode.from_tensor(weight), mode.from_tensor(bias)
            fy = torch.ops.bnas_fast.arch_batch_norm(fx, fa, fw, fb, 2, 1e-5)
            fgx = torch.ops.bnas_fast.arch_batch_norm_backward(fg, fx, fa, fw, fy[1], fy[2], 2)[0]
        assert fy[0].stride() == y.stride() and fgx.stride() == grad_x.stride(), (shape, layout)


@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous"])
def test_grad_y_in_the_other_layout(x_layout):
    """grad_y is brought to x's layout: the same bits as a grad_y given in that layout (with the C++
    kernels; the reference backend sums in another order, so only close)."""
    exact = bnas_fast.backends()["cpu"] == "cpp"

    def same_result(a, b):
        assert a.stride() == b.stride()
        if exact:
            assert torch.equal(a, b)
        else:
            assert_within(a, b, {"rtol": 1e-5, "atol": 1e-5})

    x, arch, weight, bias, grad_y = make_inputs((6, 5, 4, 3), 3, torch.float32, seed=14)
    x = _to_layout(x, x_layout)
    other = "contiguous" if x_layout == "channels_last" else "channels_last"
    _, mean, invstd, _, _ = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
    same = torch.ops.bnas_fast.arch_batch_norm_backward(_to_layout(grad_y, x_layout), x, arch, weight, mean, invstd, 3)
    mixed = torch.ops.bnas_fast.arch_batch_norm_backward(_to_layout(grad_y, other), x, arch, weight, mean, invstd, 3)
    sliced = torch.ops.bnas_fast.arch_batch_norm_backward(
        grad_y.repeat_interleave(2, dim=1)[:, ::2], x, arch, weight, mean, invstd, 3
    )
    for a, b, c in zip(same, mixed, sliced):
        same_result(b, a)
        same_result(c, a)
    scale = torch.randn(6, 5)
    same = torch.ops.bnas_fast.channel_affine_backward(_to_layout(grad_y, x_layout), x, scale)
    mixed = torch.ops.bnas_fast.channel_affine_backward(_to_layout(grad_y, other), x, scale)
    for a, b in zip(same, mixed):
        same_result(b, a)
    # and through autograd, with the public function
    xl = x.clone(memory_format=torch.preserve_format).requires_grad_()
    bnas_fast.arch_batch_norm(xl, arch, weight, bias, group_size=3).backward(_to_layout(grad_y, other))
    grad_x = torch.ops.bnas_fast.arch_batch_norm_backward(_to_layout(grad_y, x_layout), x, arch, weight, mean, invstd, 3)[0]
    same_result(xl.grad, grad_x)


@pytest.mark.parametrize("case", [((4, 3, 2, 2), 2, 2), ((6, 2, 3, 2), 3, 1)], ids=_case_id)
def test_channels_last_gradcheck(case):
    shape, group, S = case
    x, arch, weight, bias, _ = make_inputs(shape, S, torch.float64, seed=15, layout="channels_last")
    assert _is_channels_last(x)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))

    def fn(x, w, b):
        return torch.ops.bnas_fast.arch_batch_norm(x, arch, w, b, group, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs)
    scale = torch.randn(shape[:2], dtype=torch.float64, requires_grad=True)
    shift = torch.randn(shape[:2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.bnas_fast.channel_affine, (x, scale, shift))


@pytest.mark.parametrize("case", [((6, 5, 4, 3), 3, 2), ((4, 16, 17, 1), 2, 5)], ids=_case_id)
def test_channels_last_opcheck(case):
    shape, group, S = case
    x, arch, weight, bias, grad_y = make_inputs(shape, S, torch.float32, layout="channels_last")
    torch.library.opcheck(torch.ops.bnas_fast.arch_batch_norm.default, (x, arch, weight, bias, group, 1e-5))
    args = (x.requires_grad_(), arch, weight.requires_grad_(), bias.requires_grad_(), group, 1e-5)
    torch.library.opcheck(torch.ops.bnas_fast.arch_batch_norm.default, args)
    _, mean, invstd, _, _ = reference.arch_batch_norm(x.detach(), arch, weight.detach(), bias.detach(), group, 1e-5)
    for g in (_to_layout(grad_y, "channels_last"), grad_y):  # grad_y in x's layout and in the other
        torch.library.opcheck(
            torch.ops.bnas_fast.arch_batch_norm_backward.default, (g, x.detach(), arch, weight.detach(), mean, invstd, group)
        )
    scale, shift = torch.randn(shape[:2], requires_grad=True), torch.randn(shape[:2], requires_grad=True)
    torch.library.opcheck(torch.ops.bnas_fast.channel_affine.default, (x, scale, shift))
    torch.library.opcheck(torch.ops.bnas_fast.channel_affine_backward.default, (grad_y, x.detach(), scale.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("running", ["shared", "per_arch"])
def test_channels_last_eval_mode(dtype, running):
    """Eval mode (channel_affine) with a channels-last x: y against the reference, channels-last y and
    grad_x, gradients to x, weight and bias against autograd of the reference in float64."""
    x, arch, weight, bias, grad_y = make_inputs((6, 5, 4, 3), 3, dtype, seed=16, layout="channels_last")
    gen = torch.Generator().manual_seed(17)
    rshape = (5,) if running == "shared" else (3, 5)
    rm, rv = torch.randn(rshape, generator=gen).to(dtype), (torch.rand(rshape, generator=gen) + 0.5).to(dtype)
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, weight, bias)]
    y = bnas_fast.arch_batch_norm(leaves[0], arch, leaves[1], leaves[2], rm, rv, training=False)
    assert _is_channels_last(y)
    assert_within(y, reference.arch_batch_norm_eval(x, arch, weight, bias, rm, rv, 1e-5), TOLERANCES[dtype], "y")
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert _is_channels_last(grads[0])
    oracle = [t.double().requires_grad_() for t in (x, weight, bias)]
    y64 = reference.arch_batch_norm_eval(oracle[0], arch, oracle[1], oracle[2], rm.double(), rv.double(), 1e-5)
    expected = torch.autograd.grad(y64, oracle, grad_y.double())
    tol = {"rtol": TOLERANCES[dtype]["rtol"], "atol": 1e-4 if dtype == torch.float32 else 1e-10}
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, expected):
        assert_within(a, e, tol, name)


def test_channels_last_module_train_and_eval():
    """ArchBatchNorm2d on channels-last activations: the output stays channels-last in both modes, and
    equals the contiguous run."""
    torch.manual_seed(5)
    bn_cl = bnas_fast.nn.ArchBatchNorm2d(6, num_archs=3, running_stats="per_arch")
    bn = bnas_fast.nn.ArchBatchNorm2d(6, num_archs=3, running_stats="per_arch")
    bn.load_state_dict(bn_cl.state_dict())
    x, arch = torch.randn(8, 6, 5, 5) * 2 + 1, torch.randint(0, 3, (8,))
    y_cl = bn_cl(x.contiguous(memory_format=CL), arch)
    assert _is_channels_last(y_cl)
    torch.testing.assert_close(y_cl, bn(x, arch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_cl.running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn_cl.running_var, bn.running_var, rtol=1e-6, atol=1e-6)
    bn_cl.eval()
    bn.eval()
    y_cl = bn_cl(x.contiguous(memory_format=CL), arch)
    assert _is_channels_last(y_cl)
    torch.testing.assert_close(y_cl, bn(x, arch), rtol=1e-5, atol=1e-5)


def test_channels_last_large_mean_keeps_float32_accuracy():
    """The numerics of the row path in the column sums: x at mean 1e4 (the two-pass M2 per block and
    Chan's combination keep the variance) and grad_y at mean 1e3 (double sums and the mean's residual D
    keep grad_weight and grad_x), over 4 x 2 x 500 x 500 values."""
    gen = torch.Generator().manual_seed(18)
    shape = (4, 2, 500, 500)
    x = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float().contiguous(memory_format=CL)
    g = (1e3 + torch.randn(shape, generator=gen, dtype=torch.float64)).float().contiguous(memory_format=CL)
    arch = torch.zeros(4, dtype=torch.long)
    w, b = torch.ones(1, 2), torch.zeros(1, 2)
    _, _, invstd, _, _ = torch.ops.bnas_fast.arch_batch_norm(x, arch, w, b, 4, 1e-5)
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd[0].double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    reference.arch_batch_norm(x64, arch, w64, b.double(), 4, 1e-5)[0].backward(g.double())
    xk, wk = x.clone(memory_format=torch.preserve_format).requires_grad_(), w.clone().requires_grad_()
    bnas_fast.arch_batch_norm(xk, arch, wk, b).backward(g)
    assert float((wk.grad.double() - w64.grad).abs().max()) < 1e-6 * float(w64.grad.abs().max())
    assert float((xk.grad.double() - x64.grad).abs().max()) < 1e-4 * float(x64.grad.abs().max())


def test_reference_backend_follows_the_layout_contract():
    """The functions registered for the reference backend (BNAS_FAST_BACKEND=reference) return y and
    grad_x in the contract's layout, the same as the C++ op."""
    for layout in ("channels_last", "contiguous"):
        x, arch, weight, bias, grad_y = make_inputs((6, 5, 4, 3), 3, torch.float64, layout=layout)
        got = ops_module._reference_bn(x, arch, weight, bias, 3, 1e-5)
        expected = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
        for a, e in zip(got, expected):
            assert a.stride() == e.stride()
            assert_within(a, e, TOLERANCES[torch.float64])
        got = ops_module._reference_bn_backward(grad_y, x, arch, weight, got[1], got[2], 3)
        expected = torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, expected[1], expected[2], 3)
        for a, e in zip(got, expected):
            assert a.stride() == e.stride()
            assert_within(a, e, TOLERANCES[torch.float64])
        scale, shift = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        a, e = ops_module._reference_affine(x, scale, shift), torch.ops.bnas_fast.channel_affine(x, scale, shift)
        assert a.stride() == e.stride()
        assert_within(a, e, TOLERANCES[torch.float64])
        got = ops_module._reference_affine_backward(grad_y, x, scale)
        for a, e in zip(got, torch.ops.bnas_fast.channel_affine_backward(grad_y, x, scale)):
            assert a.stride() == e.stride()
            assert_within(a, e, TOLERANCES[torch.float64])


def test_per_arch_statistics_move_with_one_value_per_channel():
    """[B, C] input with one example of an architecture per batch (the common case at large S): its
    running statistics still move, and the batches it is counted in are the batches it moved in.
    By hand, cumulative average (momentum=None): architecture 0 sees 1, then 4 and 6: mean (1 + 5) / 2,
    variance the mixture 0.5 * 0 + 0.5 * 2 + 0.25 * (5 - 1)^2 = 5; architecture 1 sees 3, then 2."""
    bn = bnas_fast.nn.ArchBatchNorm1d(1, num_archs=2, running_stats="per_arch", momentum=None).double()
    bn(torch.tensor([[1.0], [3.0]], dtype=torch.float64), torch.tensor([0, 1]))
    bn(torch.tensor([[4.0], [6.0], [2.0]], dtype=torch.float64), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(bn.running_mean.flatten(), torch.tensor([3.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(bn.running_var.flatten(), torch.tensor([5.0, 0.25], dtype=torch.float64))
    assert bn.num_batches_tracked.tolist() == [2, 2]


@pytest.mark.parametrize("momentum_per", ["batch", "update"])
def test_per_arch_momentum_counts_training_batches_or_updates(momentum_per):
    """By hand, momentum 0.5, one channel. Batches 1 and 2 hold architecture 0 only (values 2 and 4:
    mean 3, unbiased variance 2); batch 3 holds architecture 1 only (5 and 7: mean 6, variance 2).
    Architecture 1 was last updated 3 batches before batch 3 (never: at the start), so "batch" moves
    it by w = 1 - 0.5^3 = 0.875 and "update" by 0.5. The mixture's variance:
    (1 - w) 1 + w 2 + w (1 - w) 6^2."""
    bn = bnas_fast.nn.ArchBatchNorm1d(1, num_archs=2, running_stats="per_arch", momentum=0.5, momentum_per=momentum_per)
    bn = bn.double()
    two = torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    for _ in range(2):
        bn(two, torch.tensor([0, 0]))
    assert bn.batches_since_update.tolist() == [0, 2]
    bn(two + 3, torch.tensor([1, 1]))
    assert bn.batches_since_update.tolist() == [1, 0]
    w = 0.875 if momentum_per == "batch" else 0.5
    torch.testing.assert_close(bn.running_mean[1], torch.tensor([6 * w], dtype=torch.float64))
    torch.testing.assert_close(bn.running_var[1], torch.tensor([(1 - w) + 2 * w + w * (1 - w) * 36], dtype=torch.float64))
    # architecture 0 was met in consecutive batches: both modes move it by 0.5 twice
    torch.testing.assert_close(bn.running_mean[0], torch.tensor([2.25], dtype=torch.float64))
    bn.eval()
    bn(two, torch.tensor([0, 1]))  # eval batches are not training batches: nothing is counted
    assert bn.batches_since_update.tolist() == [1, 0]


def test_per_arch_momentum_per_batch_matches_shared_statistics_when_every_architecture_is_present():
    """Every architecture in every batch, each with the same examples' statistics: per-architecture
    rows follow nn.BatchNorm's running statistics exactly (the per-batch and per-update counts agree)."""
    torch.manual_seed(0)
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch", momentum=0.2)
    plain = nn.BatchNorm2d(2, momentum=0.2)
    for _ in range(4):
        x = torch.randn(1, 2, 4, 4) * 3 + 1
        bn(x.expand(3, -1, -1, -1), torch.tensor([0, 1, 2]))
        plain(x)
    for s in range(3):
        torch.testing.assert_close(bn.running_mean[s], plain.running_mean, rtol=1e-5, atol=1e-6)
    assert bn.batches_since_update.tolist() == [0, 0, 0]


def test_per_arch_state_dict_without_the_batch_counter_loads():
    """State_dicts saved before momentum_per existed (and BatchNorm ones) lack batches_since_update:
    they load, strictly, with every row counted as just updated; the counter is saved and restored."""
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")
    bn(torch.randn(4, 2, 3, 3), torch.tensor([0, 0, 1, 1]))
    saved = bn.state_dict()
    assert saved["batches_since_update"].tolist() == [0, 0, 1]
    other = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")
    other.load_state_dict(saved)
    assert other.batches_since_update.tolist() == [0, 0, 1]
    old = {k: v for k, v in saved.items() if k != "batches_since_update"}
    other.load_state_dict(old)
    assert other.batches_since_update.tolist() == [0, 0, 0]
    other.load_state_dict(nn.BatchNorm2d(2).state_dict())
    assert other.batches_since_update.tolist() == [0, 0, 0]


def test_partial_state_dict_leaves_the_batch_counter_alone():
    """A state_dict without this module's statistics (e.g. only another layer's weights, loaded with
    strict=False) must not reset the counter; loading statistics into a meta module with assign=True
    puts the filled-in counter on the statistics' device."""
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")
    for arch in ([0, 0], [1, 1], [0, 0]):
        bn(torch.randn(2, 2, 3, 3), torch.tensor(arch))
    assert bn.batches_since_update.tolist() == [0, 1, 3]
    bn.load_state_dict({"weight": torch.ones(3, 2), "bias": torch.zeros(3, 2)}, strict=False)
    assert bn.batches_since_update.tolist() == [0, 1, 3]
    with torch.device("meta"):
        meta = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")
    old = {k: v for k, v in bn.state_dict().items() if k != "batches_since_update"}
    meta.load_state_dict(old, assign=True)
    assert meta.batches_since_update.device.type == "cpu" and meta.batches_since_update.tolist() == [0, 0, 0]
    meta(torch.randn(2, 2, 3, 3), torch.tensor([0, 2]))


def test_a_module_pickled_before_momentum_per_existed_keeps_its_rule_and_trains():
    """Whole-module pickles from before momentum_per lack it and the counter: unpickled, they keep
    the per-update rule they were trained with, and forward in training works."""
    bn = bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")
    del bn.momentum_per, bn._buffers["batches_since_update"]  # as such a module was
    old = pickle.loads(pickle.dumps(bn))
    assert old.momentum_per == "update" and old.batches_since_update.tolist() == [0, 0, 0]
    old(torch.randn(4, 2, 3, 3), torch.tensor([0, 0, 2, 2]))
    assert old.batches_since_update.tolist() == [0, 1, 0]
    assert "batches_since_update" in old.state_dict()
    new = pickle.loads(pickle.dumps(bnas_fast.nn.ArchBatchNorm2d(2, num_archs=3, running_stats="per_arch")))
    assert new.momentum_per == "batch"


def test_momentum_per_comes_after_device_and_dtype():
    """Positional arguments keep nn.BatchNorm-style meaning up to dtype (momentum_per was added last)."""
    bn = bnas_fast.nn.ArchBatchNorm2d(3, 2, 1e-5, 0.1, True, True, "per_arch", None, "cpu", torch.float64)
    assert bn.running_mean.dtype == torch.float64 and bn.momentum_per == "batch"


def test_bad_momentum_per_names_the_argument():
    with pytest.raises(ValueError, match="momentum_per must be one of \\('batch', 'update'\\), got 'epoch'"):
        bnas_fast.nn.ArchBatchNorm2d(3, num_archs=2, running_stats="per_arch", momentum_per="epoch")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_float32_parameters_with_a_low_precision_input_as_nn_batch_norm(low):
    """As under autocast: a float32 module, a bfloat16/float16 input. nn.BatchNorm2d takes the mix;
    so must ArchBatchNorm2d (and NSANet's fused stem batch norm), in both modes, to its precision."""
    from bnas_fast.nn.nsa import _FusedBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5).to(low)
    for module in (bnas_fast.nn.ArchBatchNorm2d(3), _FusedBatchNorm2d(3)):
        plain = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.copy_(torch.linspace(-1, 1, 3))
        module.load_state_dict(plain.state_dict())  # broadcast to every architecture
        for train in (True, False):
            module.train(train), plain.train(train)
            y, expected = module(x), plain(x)
            assert y.dtype == low
            torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
        module.train()
        module(x).float().sum().backward()
        assert module.weight.grad.dtype == torch.float32


def test_a_batch_norm_state_dict_without_num_batches_tracked_loads():
    """State dicts of version 1 (saved before num_batches_tracked existed) load, as into nn.BatchNorm."""
    from collections import OrderedDict

    old = torch.nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old = OrderedDict(old)
    old._metadata = OrderedDict({"": {"version": 1}})
    for running_stats in ("shared", "per_arch"):
        module = bnas_fast.nn.ArchBatchNorm2d(3, num_archs=2, running_stats=running_stats)
        module.num_batches_tracked.fill_(5)
        module.load_state_dict(old)
        assert int(module.num_batches_tracked.sum()) == 0


def test_recalibration_restores_each_modules_own_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), bnas_fast.nn.ArchBatchNorm2d(2), torch.nn.Dropout(0.5))
    model.eval()
    model[2].train()  # left in train on purpose
    bnas_fast.nn.recalibrate_batch_norm(model, [torch.randn(4, 1, 5, 5)])
    assert [m.training for m in model.modules()] == [False, False, False, True]


def test_backward_of_an_empty_spatial_size_is_zero_as_the_reference():
    """The op's backward on x of [B, C, 0] (a direct op call: the public function returns early on an
    empty x): no values per group, so zero parameter gradients, not 0 * inf = NaN."""
    args = (torch.randn(4, 3, 0), torch.randn(4, 3, 0), torch.zeros(4, dtype=torch.long), torch.randn(1, 3),
            torch.zeros(2, 3), torch.ones(2, 3), 2)
    got = torch.ops.bnas_fast.arch_batch_norm_backward(*args)
    assert torch.equal(got[1], torch.zeros(1, 3)) and torch.equal(got[2], torch.zeros(1, 3))
    assert got[0].shape == (4, 3, 0)
