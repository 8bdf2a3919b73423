"""Test ladder for unfolded_gram (per-filter Gauss-Newton blocks, issue 6, work in progress):
the registered op (C++ on CPU) against the unfold + einsum reference over geometries and dtypes,
the Linear form, opcheck, torch.compile(fullgraph=True), determinism, bad input. The reference
itself is checked against brute-force autograd in tests/test_unfolded_gram_reference.py. The op
has no backward (it computes curvature), so there is no gradcheck.
"""

import pytest
import torch

import bnas_fast
from bnas_fast import reference

from _threads import num_threads
from _tolerance import assert_within

# The kernel and the reference contract the same products in different orders (GEMMs over P,
# then over N K); entries are sums of N K P products of O(1) numbers. bfloat16/float16 inputs are
# converted to float32 and accumulated there by both.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-4, "atol": 1e-3},
    torch.float16: {"rtol": 1e-4, "atol": 1e-3},
}

# (N, C_in, H, W, C_out, K, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [
    (3, 4, 7, 6, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (2, 4, 9, 9, 4, 2, (3, 3), (2, 2), (0, 0), (2, 2), 2, False),
    (2, 4, 5, 5, 4, 1, (1, 3), (1, 1), (0, 1), (1, 1), 4, True),  # depthwise, non-square kernel
    (1, 3, 8, 8, 5, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, False),
    (4, 2, 11, 7, 3, 2, (5, 3), (2, 1), (2, 1), (1, 2), 1, True),
]


# Column edges of the unfolding: horizontal strides above 1 with padding (the first in-range tap
# is a rounded-up division), padding wider than the kernel reaches (whole rows of taps read only
# zeros), a single input column, and dilation with stride together.
EDGE_GEOMETRIES = [
    (2, 2, 5, 8, 3, 2, (3, 3), (1, 3), (1, 2), (1, 1), 1, True),
    (2, 2, 4, 2, 3, 2, (3, 3), (1, 1), (3, 3), (1, 1), 1, True),
    (2, 2, 3, 1, 2, 2, (2, 3), (1, 2), (1, 2), (1, 1), 1, False),
    (2, 2, 9, 9, 2, 2, (3, 3), (2, 2), (4, 4), (3, 3), 2, True),
    (1, 1, 6, 7, 1, 1, (1, 4), (1, 2), (0, 5), (1, 2), 1, True),
]


def _output_size(H, W, k, s, p, d):
    return (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1


def _inputs(geometry, dtype, seed=0):
    N, C_in, H, W, C_out, K, k, s, p, d, g, bias = geometry
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = _output_size(H, W, k, s, p, d)
    x = torch.randn(N, C_in, H, W, generator=gen, dtype=torch.float64).to(dtype)
    factors = torch.randn(N, K, C_out, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, factors, dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, bias=bias)


@pytest.mark.parametrize("geometry", GEOMETRIES + EDGE_GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_op_matches_reference(dtype, geometry):
    x, factors, conv = _inputs(geometry, dtype)
    got = bnas_fast.unfolded_gram(x, factors, **conv)
    expected = reference.unfolded_gram(x, factors, conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["bias"])
    assert got.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert_within(got, expected, TOLERANCES[dtype], "blocks")
    diagonal = bnas_fast.unfolded_gram(x, factors, **conv, diagonal=True)
    assert_within(diagonal, expected.diagonal(dim1=1, dim2=2), TOLERANCES[dtype], "diagonal")
    # each block is a Gram matrix: symmetric, positive semi-definite
    if dtype == torch.float64:
        torch.testing.assert_close(got, got.transpose(1, 2))
        assert float(torch.linalg.eigvalsh(got).min()) > -1e-9 * float(got.abs().max())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("diagonal", [False, True])
def test_k_major_factors_read_in_place(geometry, diagonal):
    """Factors laid out [K, N, ...] in memory and viewed as [N, K, ...] (what one batched backward
    pass gives) take the per-k GEMM path; the blocks are those of the same values in N-major order."""
    x, factors, conv = _inputs(geometry, torch.float64)
    k_major = factors.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(k_major, factors)
    if factors.shape[0] > 1 and factors.shape[1] > 1:  # otherwise both layouts are contiguous
        assert not k_major.is_contiguous()
    got = bnas_fast.unfolded_gram(x, k_major, **conv, diagonal=diagonal)
    expected = bnas_fast.unfolded_gram(x, factors, **conv, diagonal=diagonal)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_linear_layer_form():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    factors = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    got = bnas_fast.unfolded_gram(x, factors, bias=True)
    # by hand: j[n,k,o] = factors[n,k,o] [x[n], 1], so G[o] = sum_{n,k} factors[n,k,o]^2 [x[n], 1] [x[n], 1]^T
    xa = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    expected = torch.einsum("nko,nd,ne->ode", factors**2, xa, xa)
    torch.testing.assert_close(got, expected)


def test_opcheck():
    x, factors, conv = _inputs(GEOMETRIES[0], torch.float32)
    args = (x, factors, list(conv["kernel_size"]), list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), conv["groups"], conv["bias"])
    torch.library.opcheck(torch.ops.bnas_fast.unfolded_gram.default, args)
    torch.library.opcheck(torch.ops.bnas_fast.unfolded_gram.default, args + (True,))  # diagonal only


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, factors, conv = _inputs(GEOMETRIES[1], torch.float32)

    def blocks(x, factors):
        return bnas_fast.unfolded_gram(x, factors, **conv).diagonal(dim1=1, dim2=2).sum()

    compiled = torch.compile(blocks, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, factors), blocks(x, factors))


def test_deterministic_across_thread_counts():
    x, factors, conv = _inputs((8, 6, 10, 10, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, True), torch.float32)
    first = bnas_fast.unfolded_gram(x, factors, **conv)
    for threads in (1, 2):
        with num_threads(threads):
            torch.testing.assert_close(bnas_fast.unfolded_gram(x, factors, **conv), first, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(groups=3), ValueError, r"groups = 3 must divide C_in = 4 and C_out = 6"),
        (dict(stride=2), ValueError, r"factors' output size \(7, 6\) does not match the convolution's \(4, 3\)"),
        (dict(kernel_size=0), ValueError, r"kernel_size must be an int >= 1"),
        (dict(padding=-1), ValueError, r"padding must be an int >= 0"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int >= 1 or a pair"),
        (dict(kernel_size=3.0), ValueError, r"kernel_size must be an int >= 1 or a pair"),
        (dict(padding=(1, 2**62)), ValueError, r"padding must be below 2\^31"),
        (dict(dilation=2**64), ValueError, r"dilation must be below 2\^31"),
        (dict(kernel_size=9, padding=0, factors=torch.randn(3, 3, 6, 0, 0)), ValueError, r"kernel .* is larger than the padded input"),
        (dict(x=torch.randn(2, 4, 7, 6)), ValueError, r"factors has N = 3 but x has N = 2"),
        (dict(x=torch.randn(3, 4, 7)), ValueError, r"need x \[N, C_in, H, W\]"),
        (dict(factors=torch.randn(3, 3, 6, 7, 6, dtype=torch.float64)), TypeError, r"factors has dtype torch.float64 but x has dtype torch.float32"),
        (dict(x=torch.randint(0, 2, (3, 4, 7, 6))), TypeError, r"x must be a floating-point tensor"),
    ],
)
def test_bad_input_names_the_argument(change, error, pattern):
    x, factors, conv = _inputs(GEOMETRIES[0], torch.float32)
    x = change.pop("x", x)
    factors = change.pop("factors", factors)
    conv.update(change)
    with pytest.raises(error, match=pattern):
        bnas_fast.unfolded_gram(x, factors, **conv)


def test_direct_op_calls_are_checked_in_cpp():
    x, factors, _ = _inputs(GEOMETRIES[0], torch.float32)
    with pytest.raises(ValueError, match=r"does not match the convolution's 4x3"):
        torch.ops.bnas_fast.unfolded_gram(x, factors, [3, 3], [2, 2], [1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match=r"groups = 5 must divide"):
        torch.ops.bnas_fast.unfolded_gram(x, factors, [3, 3], [1, 1], [1, 1], [1, 1], 5, True)
    with pytest.raises(ValueError, match=r"kernel is larger than the padded input"):  # Ho = 0: no convolution
        torch.ops.bnas_fast.unfolded_gram(x, torch.randn(3, 3, 6, 0, 0), [9, 9], [1, 1], [0, 0], [1, 1], 1, True)
    # 2 * padding and dilation * (kernel - 1) would overflow int64 (review of 2026-12-02)
    with pytest.raises(ValueError, match=r"padding must be below 2\^31"):
        torch.ops.bnas_fast.unfolded_gram(x, factors, [3, 3], [1, 1], [2**62, 1], [2**62, 1], 1, True)


def _rank_one_factors(geometry, dtype, k_major=False, seed=2):
    """Factors S[n, k, o] = c[n, k, o] w[n, o] (rank one per example and output channel), with
    some (n, o) all zero: what a layer followed only by elementwise ops and a global average pool
    receives. The kernel compresses them to one factor each."""
    x, factors, conv = _inputs(geometry, dtype, seed)
    N, K, C_out = factors.shape[:3]
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn((N, 1) + tuple(factors.shape[2:]), generator=gen, dtype=torch.float64)
    w = w * (torch.rand(w.shape, generator=gen, dtype=torch.float64) > 0.4)  # ReLU-like masks
    c = torch.randn(N, K, C_out, 1, 1, generator=gen, dtype=torch.float64)
    c[0, :, 0] = 0  # a dead unit: all K factors of (n=0, o=0) are zero
    factors = (c * w).to(dtype)
    if k_major:
        factors = factors.transpose(0, 1).contiguous().transpose(0, 1)
    return x, factors, conv


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k_major", [False, True], ids=["n_major", "k_major"])
def test_rank_one_factors_are_compressed_exactly(geometry, dtype, k_major):
    x, factors, conv = _rank_one_factors(geometry, dtype, k_major)
    args = (conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["bias"])
    expected = reference.unfolded_gram(x, factors, *args)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    assert_within(bnas_fast.unfolded_gram(x, factors, **conv), expected, tol, "blocks")
    assert_within(bnas_fast.unfolded_gram(x, factors, **conv, diagonal=True), expected.diagonal(dim1=1, dim2=2), tol, "diagonal")


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_rank_one_factors_too_small_to_square_are_kept(geometry):
    """Rank-one float32 factors of about 1e-24: their squared norms underflow to 0, and the test for
    rank one once took every channel for dead (zero blocks). With a large input the blocks are
    representable (about 1e-20) and must match the float64 reference."""
    x, factors, conv = _rank_one_factors(geometry, torch.float64)
    x, factors = (x * 1e14).float(), (factors * 1e-24).float()
    args = (conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["bias"])
    expected = reference.unfolded_gram(x.double(), factors.double(), *args)
    assert float(expected.abs().max()) > 1e-20
    got = bnas_fast.unfolded_gram(x, factors, **conv).double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got / scale, expected / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_rank_one_factors_that_are_subnormal_are_right(geometry):
    """Float32 factors of about 1e-40 (subnormal): 2^-exponent of their largest entry is not a
    float32, so the rank-one test scales them with ldexp instead. Compressed or not, the blocks
    must match the float64 reference (the factors carry fewer bits: a looser tolerance)."""
    x, factors, conv = _rank_one_factors(geometry, torch.float64)
    x, factors = (x * 1e25).float(), (factors * 1e-40).float()
    assert float(factors.abs().max()) < torch.finfo(torch.float32).tiny  # subnormal, as intended
    args = (conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["bias"])
    expected = reference.unfolded_gram(x.double(), factors.double(), *args)
    got = bnas_fast.unfolded_gram(x, factors, **conv).double()
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got / scale, expected / scale, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_nearly_rank_one_factors_are_not_compressed(geometry):
    """A residual of 1e-6 off rank one is far above rounding: the kernel must keep all K factors
    (compressing would change the blocks at the 1e-6 level, far outside 1e-11)."""
    x, factors, conv = _rank_one_factors(geometry, torch.float64)
    gen = torch.Generator().manual_seed(5)
    factors = factors + 1e-6 * torch.randn(factors.shape, generator=gen, dtype=torch.float64)
    args = (conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["bias"])
    torch.testing.assert_close(bnas_fast.unfolded_gram(x, factors, **conv), reference.unfolded_gram(x, factors, *args),
                               rtol=1e-11, atol=1e-11)
