"""The Triton arch_batch_norm / channel_affine kernels against bnas_fast.reference, run by Triton's
interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs each program in
Python, so the tensors here are small; the whole file takes a few seconds.

The four launchers are called directly (there is no CUDA device to dispatch the registered ops to);
test_op_path_functions also calls the functions that bnas_fast.ops.arch_batch_norm registers for
CUDA, on CPU tensors, and compares them with the CPU op.
"""

import importlib
import math

import pytest

pytest.importorskip("triton")

import torch
import torch.nn.functional as F

from bnas_fast import reference
from bnas_fast.triton import arch_batch_norm as triton_bn

# The op module itself (bnas_fast.ops re-exports its public function under the same name).
ops_bn = importlib.import_module("bnas_fast.ops.arch_batch_norm")

# |actual - expected| <= atol + rtol |expected|, chosen by the dtype of the output. float64 and
# float32: the kernels and the reference sum in different orders (tiles of the row, Chan's
# combination, folded scale and shift vs torch's reductions over (x - mean) invstd); values are ~1
# to 5. The atol of a sum of n terms is scaled by sqrt(n) (see assert_close). bfloat16/float16
# outputs are rounded once from float32, and the interpreter's float32 -> bfloat16 cast truncates
# instead of rounding to nearest: one unit in the last place, 2^-7 (2^-10) relative.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-3},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
}

# (x shape, group_size, S): 2-D inputs (L = 1) with one group (group_size = B) and with ghost
# batches; a 3-D input; the odd 4-D shape with group_size = B, 3 and 2 and S = 1 or 4; and a row of
# L = 1089 > MAX_TILE = 1024 values (two steps of the row loop, the two-pass statistics).
CASES = [
    ((6, 5), 6, 1),
    ((6, 5), 2, 4),
    ((6, 4, 7), 3, 4),
    ((6, 3, 5, 7), 6, 4),
    ((6, 3, 5, 7), 3, 1),
    ((6, 3, 5, 7), 2, 4),
    ((2, 2, 33, 33), 1, 3),
]
FLOAT_DTYPES = [torch.float32, torch.float64]


def case_id(case):
    shape, group, S = case
    return f"{'x'.join(map(str, shape))}-g{group}-S{S}"


def dtype_id(dtype):
    return str(dtype)[6:]


def make_inputs(shape, S, dtype, seed=0):
    """x [B, C, *] (mean 0.5, std 2), arch [B] in [0, S), weight and bias [S, C], grad_y like x."""
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    x = (2 * torch.randn(shape, generator=gen) + 0.5).to(dtype)
    arch = torch.randint(0, S, (B,), generator=gen)
    weight = (1 + 0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(S, C, generator=gen)).to(dtype)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    return x, arch, weight, bias, grad_y


def make_affine(shape, dtype, seed=0):
    """scale, shift [B, C] in the accumulation dtype of x's dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed + 100)
    B, C = shape[0], shape[1]
    return (1 + torch.randn(B, C, generator=gen)).to(acc), torch.randn(B, C, generator=gen).to(acc)


def assert_close(actual, expected, what, terms=1):
    """Same shape and dtype, and close within TOLERANCES[dtype]; ``terms`` is the number of values
    summed into each element (the rounding of a sum grows like sqrt(terms))."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * math.sqrt(terms), msg=lambda m: f"{what}: {m}"
    )


def assert_layout(t, x, what):
    """t (of x's shape) in the layout of the ops' contract: channels-last for a channels-last x that is
    not also contiguous, else contiguous."""
    layout = ops_bn.output_memory_format(x)
    assert t.is_contiguous(memory_format=layout), f"{what}: strides {t.stride()} not {layout}"


def check_all(x, arch, weight, bias, grad_y, group_size, eps=1e-5):
    """All four launchers against the reference on one set of inputs."""
    B, L = x.shape[0], x[0, 0].numel()
    N = group_size * L

    got = triton_bn.arch_batch_norm(x, arch, weight, bias, group_size, eps)
    expected = reference.arch_batch_norm(x, arch, weight, bias, group_size, eps)
    assert_layout(got[0], x, "y")
    for name, a, e, terms in zip(("y", "mean", "invstd", "row_mean", "row_m2"), got, expected, (1, N, N, L, L)):
        assert_close(a, e, name, terms)

    # The backward of both from the same statistics (the reference's).
    mean, invstd = expected[1], expected[2]
    got = triton_bn.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group_size)
    expected = reference.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group_size)
    assert_layout(got[0], x, "grad_x")
    for name, a, e, terms in zip(("grad_x", "grad_weight", "grad_bias"), got, expected, (N, B * L, B * L)):
        assert_close(a, e, name, terms)

    scale, shift = make_affine(x.shape, x.dtype)
    y = triton_bn.channel_affine(x, scale, shift)
    assert_layout(y, x, "channel_affine y")
    assert_close(y, reference.channel_affine(x, scale, shift), "channel_affine y")
    got = triton_bn.channel_affine_backward(grad_y, x, scale)
    expected = reference.channel_affine_backward(grad_y, x, scale)
    assert_layout(got[0], x, "channel_affine grad_x")
    for name, a, e, terms in zip(("grad_x", "grad_scale", "grad_shift"), got, expected, (1, L, L)):
        assert_close(a, e, f"channel_affine {name}", terms)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_matches_reference(dtype, case):
    shape, group_size, S = case
    check_all(*make_inputs(shape, S, dtype, seed=sum(shape) + S), group_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_low_precision_accumulates_in_float32(dtype):
    """Statistics and row sums in float32; y and grad_x rounded once to the input dtype; grad_weight
    and grad_bias rounded once to weight's dtype (see TOLERANCES)."""
    x, arch, weight, bias, grad_y = make_inputs((6, 3, 5, 7), 4, dtype, seed=1)
    out = triton_bn.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
    assert out[0].dtype == dtype and all(t.dtype == torch.float32 for t in out[1:])
    check_all(x, arch, weight, bias, grad_y, 3)


@pytest.mark.parametrize(
    "shape,S,group_size,tiling",
    [
        ((2, 3, 5, 7), 2, 2, (1, 16, 6)),  # L = 35: 3 steps of BLOCK_L = 16 per row, one row per program
        ((6, 3, 3), 4, 3, (4, 4, 5)),  # 18 rows of L = 3, 4 per program, the last program half empty
        ((10, 3), 3, 5, (16, 1, 2)),  # 30 rows of L = 1, 16 per program
    ],
    ids=["long-rows", "rows-per-program", "L1"],
)
def test_tiling(monkeypatch, shape, S, group_size, tiling):
    """A small MAX_TILE: rows that loop over several blocks (two-pass statistics), several rows per
    program, and programs whose last rows are padding."""
    monkeypatch.setattr(triton_bn, "MAX_TILE", 16)
    rows, L = shape[0] * shape[1], math.prod(shape[2:])
    assert triton_bn._tiling(rows, L) == tiling
    check_all(*make_inputs(shape, S, torch.float64, seed=2), group_size)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_non_contiguous_inputs(dtype):
    """x and grad_y in channels-last and sliced layouts, weight and bias sliced: the launchers read
    them through contiguous copies, and return channels-last y and grad_x for the channels-last x
    and contiguous ones for the sliced x (the layout contract)."""
    x, arch, weight, bias, grad_y = make_inputs((4, 6, 3, 5), 3, dtype, seed=3)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    check_all(channels_last, arch, weight, bias, grad_y.contiguous(memory_format=torch.channels_last), 2)
    check_all(x[:, ::2], arch, weight[:, ::2], bias[:, ::2], grad_y[:, 1::2], 4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_channels_last_x(dtype, grad_layout):
    """A channels-last x (grad_y in either layout), S = 1 and 3, one group and ghost batches: the
    launchers against the reference, y and grad_x channels-last; the functions registered for CUDA
    give the CPU op's strides and values. The ambiguous C = 1 stays contiguous."""
    for shape, S, group_size in [((6, 5, 4, 3), 1, 6), ((6, 5, 4, 3), 3, 2), ((4, 3, 2, 33), 2, 4)]:
        x, arch, weight, bias, grad_y = make_inputs(shape, S, dtype, seed=6)
        x = x.contiguous(memory_format=torch.channels_last)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format)
        assert ops_bn.output_memory_format(x) == torch.channels_last
        check_all(x, arch, weight, bias, grad_y, group_size)
        got = ops_bn._triton_bn(x, arch, weight, bias, group_size, 1e-5)
        expected = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, group_size, 1e-5)
        assert got[0].stride() == expected[0].stride()
        grad_x = ops_bn._triton_bn_backward(grad_y, x, arch, weight, got[1], got[2], group_size)[0]
        expected_grad_x = torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, got[1], got[2], group_size)[0]
        assert grad_x.stride() == expected_grad_x.stride()
        assert_close(grad_x, expected_grad_x, "grad_x vs the CPU op", shape[0] * x[0, 0].numel())
    x, arch, weight, bias, grad_y = make_inputs((4, 1, 3, 5), 2, dtype, seed=7)
    x = x.contiguous(memory_format=torch.channels_last)  # C = 1: also contiguous
    assert ops_bn.output_memory_format(x) == torch.contiguous_format
    check_all(x, arch, weight, bias, grad_y, 2)


def test_large_offset_keeps_variance_accurate():
    """Values 1e4 + N(0, 1) in float32: the two-pass row statistics and Chan's combination keep the
    variance (a one-pass E[x^2] - E[x]^2 would lose it entirely to cancellation)."""
    gen = torch.Generator().manual_seed(4)
    x64 = 1e4 + torch.randn(6, 3, 5, 7, generator=gen, dtype=torch.float64)
    arch = torch.zeros(6, dtype=torch.int64)
    weight, bias = torch.ones(1, 3), torch.zeros(1, 3)
    y, mean, invstd, _, row_m2 = triton_bn.arch_batch_norm(x64.float(), arch, weight, bias, 3, 1e-5)
    _, mean64, invstd64, _, row_m2_64 = reference.arch_batch_norm(
        x64.float().double(), arch, weight.double(), bias.double(), 3, 1e-5
    )
    torch.testing.assert_close(invstd.double(), invstd64, rtol=1e-4, atol=0)
    torch.testing.assert_close(row_m2.double(), row_m2_64, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    assert y.isfinite().all()


def _float64_truth(x, arch, g, w, b):
    """y, grad_x and grad_weight of the reference in float64 from the same float32 values (one
    statistics group)."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference.arch_batch_norm(x64, arch, w64, b.double(), x.shape[0], 1e-5)[0]
    y64.backward(g.double())
    return y64.detach(), x64.grad, w64.grad


def _triton_forward_backward(x, arch, g, w, b):
    """y, grad_x and grad_weight of the launchers, the backward from the forward's statistics."""
    y, mean, invstd, _, _ = triton_bn.arch_batch_norm(x, arch, w, b, x.shape[0], 1e-5)
    grad_x, grad_weight, _ = triton_bn.arch_batch_norm_backward(g, x, arch, w, mean, invstd, x.shape[0])
    return y, grad_x, grad_weight


def _max_error(a, truth):
    return float((a.double() - truth).abs().max())


def test_many_rows_at_a_large_mean_keep_float32_accuracy():
    """x [2e5, 1] at mean 1e4 (the C++ test's 1e6 rows, cut for the interpreter). The old launchers
    normalised as x scale + (bias - mean scale), which cancels at a large mean, and left the float32
    rounding of the mean (up to 5e-4 here) in y and, summed against the gradient, in grad_weight:
    y 9e-4 off, grad_weight 2e-3 relative. Now: (x - mean) scale + shift with the mean's rounding
    taken out in the shift, and the mean's residual delta in the backward: y ~5e-7, grad_weight
    ~6e-8 relative (float32 torch.nn.functional.batch_norm: y 5 off, grad_weight 4 times its size)."""
    gen = torch.Generator().manual_seed(7)
    B = 200_000
    x = (1e4 + torch.randn(B, 1, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(B, 1, generator=gen, dtype=torch.float64).float()
    arch = torch.zeros(B, dtype=torch.long)
    w, b = torch.ones(1, 1), torch.zeros(1, 1)
    y64, gx64, gw64 = _float64_truth(x, arch, g, w, b)
    y, gx, gw = _triton_forward_backward(x, arch, g, w, b)
    assert _max_error(y, y64) < 1e-5
    assert _max_error(gx, gx64) < 2e-6 * float(gx64.abs().max())
    assert _max_error(gw, gw64) < 1e-6 * float(gw64.abs().max())


@pytest.mark.parametrize("x_mean", [0.0, 1e4])
def test_a_large_mean_of_the_gradient(x_mean):
    """grad_y at mean 1e3 over two rows of 2e5 values (the C++ test's 1e6, cut for the interpreter).
    The float32 mean of x is rounded (to 1e-3 at 1e4), and near a small mean x - mean rounded to
    float32 has the same error for every x of a binade; summed against the large mean of g, either
    bias swamps grad_weight, which is ~sqrt(N) (the old launchers: 0.9% off at x_mean = 0; 550 times
    its size, and grad_x 45% of its size, at x_mean = 1e4, as float32 torch). With D = sum (x - mean)
    from the same rounded values, Bs - delta A is a centred covariance and both biases cancel; what
    is left is the float32 row sums: ~2e-4 relative on grad_weight, ~2e-5 on grad_x, where the C++
    kernel's double row sums reach 1e-7 (float32 torch.nn.functional.batch_norm: 1% and 1.4e-4 at
    x_mean = 0)."""
    gen = torch.Generator().manual_seed(8)
    n = 200_000
    x = (x_mean + torch.randn(2, 1, n, generator=gen, dtype=torch.float64)).float()
    g = (1e3 + torch.randn(2, 1, n, generator=gen, dtype=torch.float64)).float()
    arch = torch.zeros(2, dtype=torch.long)
    w, b = torch.ones(1, 1), torch.zeros(1, 1)
    _, gx64, gw64 = _float64_truth(x, arch, g, w, b)
    _, gx, gw = _triton_forward_backward(x, arch, g, w, b)
    xt, wt = x.clone().requires_grad_(), w[0].clone().requires_grad_()
    F.batch_norm(xt, None, None, wt, b[0], training=True).backward(g)
    ours_w, torch_w = _max_error(gw, gw64), _max_error(wt.grad, gw64)
    ours_x, torch_x = _max_error(gx, gx64), _max_error(xt.grad, gx64)
    assert ours_w < 1e-3 * float(gw64.abs().max()) and ours_w < torch_w, (ours_w, torch_w)
    assert ours_x < 1e-4 * float(gx64.abs().max()) and ours_x < torch_x, (ours_x, torch_x)


def test_op_path_functions():
    """The functions bnas_fast.ops.arch_batch_norm registers for CUDA, called on CPU tensors: same
    outputs (shapes, dtypes, values) as the CPU op, and the forward's arch range check."""
    x, arch, weight, bias, grad_y = make_inputs((6, 3, 5, 7), 4, torch.float64, seed=5)
    got = ops_bn._triton_bn(x, arch, weight, bias, 3, 1e-5)
    expected = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, 3, 1e-5)
    assert isinstance(got, tuple) and len(got) == 5
    for name, a, e in zip(("y", "mean", "invstd", "row_mean", "row_m2"), got, expected):
        assert_close(a, e, name)
    mean, invstd = got[1], got[2]
    got = ops_bn._triton_bn_backward(grad_y, x, arch, weight, mean, invstd, 3)
    expected = torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, 3)
    assert isinstance(got, tuple) and len(got) == 3
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, expected):
        assert_close(a, e, name)

    scale, shift = make_affine(x.shape, x.dtype)
    assert_close(ops_bn._triton_affine(x, scale, shift), torch.ops.bnas_fast.channel_affine(x, scale, shift), "y")
    got = ops_bn._triton_affine_backward(grad_y, x, scale)
    expected = torch.ops.bnas_fast.channel_affine_backward(grad_y, x, scale)
    assert isinstance(got, tuple) and len(got) == 3
    for name, a, e in zip(("grad_x", "grad_scale", "grad_shift"), got, expected):
        assert_close(a, e, name)

    with pytest.raises(IndexError, match="arch"):
        ops_bn._triton_bn(x, torch.full_like(arch, 4), weight, bias, 3, 1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 2, 0), (3, 0)], ids=["B0", "L0", "C0"])
def test_channel_affine_empty(shape):
    """No launch for an empty tensor: empty outputs and zero sums (an empty sum)."""
    x = torch.randn(shape)
    grad_y = torch.randn(shape)
    scale, shift = torch.randn(shape[0], shape[1]), torch.randn(shape[0], shape[1])
    y = triton_bn.channel_affine(x, scale, shift)
    assert y.shape == x.shape and y.dtype == x.dtype
    grad_x, grad_scale, grad_shift = triton_bn.channel_affine_backward(grad_y, x, scale)
    assert grad_x.shape == x.shape
    assert grad_scale.shape == grad_shift.shape == (shape[0], shape[1])
    assert (grad_scale == 0).all() and (grad_shift == 0).all()


def _bad(call, pattern, error=ValueError):
    """A case: ``call`` must raise ``error`` matching ``pattern`` ("^op: argument ..."); id "op-argument"."""
    op, message = pattern[1:].split(": ", 1)
    return pytest.param(call, error, pattern, id=f"{op}-{message.split()[0]}")


# Valid arguments: x [B, C, L] = [4, 3, 5], S = 2, group_size = 2 (G = 2).
_X, _A, _W, _B = torch.randn(4, 3, 5), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), torch.randn(2, 3)
_M, _I, _SC, _SH = torch.randn(2, 3), torch.rand(2, 3) + 1, torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A[:3], _W, _B, 2, 1e-5),
             r"^arch_batch_norm: arch must be a \[B\] = \[4\] int64 tensor"),
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A, _W[:, :2], _B, 2, 1e-5),
             r"^arch_batch_norm: weight must be \[S, C\] with C = 3"),
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A, _W, _B[:1], 2, 1e-5),
             r"^arch_batch_norm: bias must be \[S, C\] = \(2, 3\) like weight, got \(1, 3\)"),
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A, _W.double(), _B, 2, 1e-5),
             r"^arch_batch_norm: weight has dtype torch.float64 but x has torch.float32"),
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A, _W, _B, 3, 1e-5),
             r"^arch_batch_norm: group_size = 3 must be >= 1 and divide the batch size B = 4"),
        _bad(lambda: triton_bn.arch_batch_norm(_X, _A, _W, _B, 2, float("nan")),
             r"^arch_batch_norm: eps must be finite and >= 0"),
        _bad(lambda: triton_bn.arch_batch_norm(_X[:, :, :1], _A, _W, _B, 1, 1e-5),
             r"^arch_batch_norm: each statistics group has 1 value per channel"),
        _bad(lambda: triton_bn.arch_batch_norm(_X[:, 0, 0], _A, _W, _B, 2, 1e-5),
             r"^arch_batch_norm: x must be \[B, C, \*\]"),
        _bad(lambda: triton_bn.arch_batch_norm_backward(_X[:2], _X, _A, _W, _M, _I, 2),
             r"^arch_batch_norm_backward: grad_y must match x"),
        _bad(lambda: triton_bn.arch_batch_norm_backward(_X, _X, _A, _W[:, :2], _M, _I, 2),
             r"^arch_batch_norm_backward: weight must be \[S, C\] with C = 3"),
        _bad(lambda: triton_bn.arch_batch_norm_backward(_X, _X, _A, _W, _M[:1], _I, 2),
             r"^arch_batch_norm_backward: mean must be \[G, C\] = \[2, 3\]"),
        _bad(lambda: triton_bn.arch_batch_norm_backward(_X, _X, _A, _W, _M, _I.double(), 2),
             r"^arch_batch_norm_backward: invstd must be \[G, C\] = \[2, 3\] of dtype torch.float32"),
        _bad(lambda: triton_bn.channel_affine(_X, _SC[:3], _SH),
             r"^channel_affine: scale must be \[B, C\] = \[4, 3\]"),
        _bad(lambda: triton_bn.channel_affine(_X, _SC.double(), _SH.double()),
             r"^channel_affine: scale must have dtype torch.float32 for x of dtype torch.float32"),
        _bad(lambda: triton_bn.channel_affine(_X, _SC, _SH[:, :2]),
             r"^channel_affine: shift must match scale"),
        _bad(lambda: triton_bn.channel_affine(_X.long(), _SC, _SH),
             r"^channel_affine: x must be a float16, bfloat16, float32 or float64 tensor", TypeError),
        _bad(lambda: triton_bn.channel_affine_backward(_X[:, :2], _X, _SC),
             r"^channel_affine_backward: grad_y must match x"),
        _bad(lambda: triton_bn.channel_affine_backward(_X, _X, _SC[:, :2]),
             r"^channel_affine_backward: scale must be \[B, C\] = \[4, 3\]"),
    ],
)
def test_bad_arguments_are_caught_before_launch(call, error, pattern):
    """A direct op call on CUDA reaches the launchers unchecked: they repeat the C++ kernel's checks
    (a weight, scale or statistic with too few rows or columns would be read out of bounds)."""
    with pytest.raises(error, match=pattern):
        call()
