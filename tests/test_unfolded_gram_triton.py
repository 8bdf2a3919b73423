"""The Triton unfolded_gram kernels against bnas_fast.reference, run by Triton's interpreter on CPU
tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs each program in
Python, so the shapes are small (the geometries of tests/test_unfolded_gram.py); the file takes a
few seconds.

The launcher is called directly (there is no CUDA device to dispatch the registered op to);
test_op_path_function also calls the function that bnas_fast.ops.unfolded_gram registers for CUDA,
on CPU tensors, and compares it with the CPU op.
"""

import importlib

import pytest

pytest.importorskip("triton")

import torch

from bnas_fast import reference
from bnas_fast.triton import unfolded_gram as triton_ug

from _tolerance import assert_within
from test_unfolded_gram import GEOMETRIES, TOLERANCES, _inputs

# The op module itself (bnas_fast.ops re-exports its public function under the same name).
ops_ug = importlib.import_module("bnas_fast.ops.unfolded_gram")

# TOLERANCES are the CPU op's: the kernels and the reference contract the same products in
# different orders (tiles of P, then of N K). float16/bfloat16 inputs are converted exactly to
# float32 by both (the interpreter's widening casts are exact; only its narrowing bfloat16 cast
# truncates, and no output here is narrowed) and accumulated there, so they share float32's.


def dtype_id(dtype):
    return str(dtype)[6:]


def conv_args(conv):
    return tuple(conv[name] for name in ("kernel_size", "stride", "padding", "dilation", "groups", "bias"))


def check(x, factors, conv, tol):
    """Blocks and diagonals of the launcher against the reference on one set of inputs."""
    args = conv_args(conv)
    expected = reference.unfolded_gram(x, factors, *args)
    got = triton_ug.unfolded_gram(x, factors, *args)
    assert got.dtype == expected.dtype and got.is_contiguous()
    assert_within(got, expected, tol, "blocks")
    diagonal = triton_ug.unfolded_gram(x, factors, *args, diagonal=True)
    assert diagonal.dtype == expected.dtype and diagonal.is_contiguous()
    assert_within(diagonal, expected.diagonal(dim1=1, dim2=2), tol, "diagonal")
    return got


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
def test_matches_reference(dtype, geometry):
    x, factors, conv = _inputs(geometry, dtype)
    got = check(x, factors, conv, TOLERANCES[dtype])
    assert got.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    if dtype == torch.float64:  # a Gram matrix; the lower triangle of tiles mirrors the upper one
        torch.testing.assert_close(got, got.transpose(1, 2), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("diagonal", [False, True])
def test_k_major_factors_read_in_place(geometry, diagonal):
    """Factors laid out [K, N, ...] in memory and viewed as [N, K, ...] (what one batched backward
    pass gives) are read through their strides; the blocks are those of the N-major factors."""
    x, factors, conv = _inputs(geometry, torch.float64)
    k_major = factors.transpose(0, 1).contiguous().transpose(0, 1)
    if factors.shape[0] > 1 and factors.shape[1] > 1:  # otherwise both layouts are contiguous
        assert not k_major.is_contiguous()
    got = triton_ug.unfolded_gram(x, k_major, *conv_args(conv), diagonal=diagonal)
    expected = triton_ug.unfolded_gram(x, factors, *conv_args(conv), diagonal=diagonal)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    full = reference.unfolded_gram(x, factors, *conv_args(conv))
    expected = full.diagonal(dim1=1, dim2=2) if diagonal else full
    assert_within(got, expected, TOLERANCES[torch.float64], "blocks")


@pytest.mark.parametrize(
    "geometry",
    [
        # K Og = 36 rows (3 blocks of 16), P = 42 (3 steps), D' = 37 (3 blocks: 6 Gram tiles per
        # channel, 3 of them also stored mirrored), R = 18 (2 steps)
        (3, 4, 7, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
        # two groups: Og = 2, K Og = 20 (2 blocks), D' = 18 (2 blocks), P = 25 (2 steps), R = 20 (2 steps)
        (2, 12, 5, 5, 4, 10, (3, 1), (1, 1), (1, 0), (1, 1), 2, False),
    ],
    ids=["one-group", "two-groups"],
)
def test_tiling(monkeypatch, geometry):
    """Every block at its smallest (16; the diagonal kernel's tile 64): several blocks of rows,
    coordinates and Gram tiles per output channel, several steps of the P and R loops, and
    partial (masked) last blocks everywhere."""
    for name in ("MAX_BLOCK_M", "MAX_BLOCK_P", "MAX_BLOCK_D", "MAX_BLOCK_R"):
        monkeypatch.setattr(triton_ug, name, 16)
    monkeypatch.setattr(triton_ug, "MAX_DIAGONAL_TILE", 64)
    x, factors, conv = _inputs(geometry, torch.float64, seed=1)
    check(x, factors, conv, TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_non_contiguous_inputs(dtype):
    """x channels-last and sliced, factors sliced: read through their strides, no copy needed."""
    x, factors, conv = _inputs(GEOMETRIES[0], dtype, seed=2)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    check(channels_last, factors, conv, TOLERANCES[dtype])
    wide_x = torch.cat([x, x.flip(1)], 1)[:, ::2]  # [N, C_in, H, W], channel stride 2
    wide_f = torch.cat([factors, -factors], 2)[:, :, 1::2]  # [N, K, C_out, Ho, Wo], channel stride 2
    assert not wide_x.is_contiguous() and not wide_f.is_contiguous()
    check(wide_x, wide_f, conv, TOLERANCES[dtype])


def test_linear_layer_form():
    """x [N, C_in] and factors [N, K, C_out]: G[o] = sum_{n,k} S[n,k,o]^2 [x[n], 1] [x[n], 1]^T."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    factors = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    got = triton_ug.unfolded_gram(x, factors, (1, 1), (1, 1), (0, 0), (1, 1), 1, True)
    xa = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    expected = torch.einsum("nko,nd,ne->ode", factors**2, xa, xa)
    torch.testing.assert_close(got, expected)


def test_op_path_function():
    """The function bnas_fast.ops.unfolded_gram registers for CUDA, called on CPU tensors: same
    blocks (shape, dtype, values) as the CPU op."""
    assert ops_ug._KERNELS["triton"]["unfolded_gram"] is ops_ug._triton_kernel
    x, factors, conv = _inputs(GEOMETRIES[1], torch.float64, seed=4)
    args = (x, factors, *(list(a) for a in conv_args(conv)[:4]), conv["groups"], conv["bias"])
    for diagonal in (False, True):
        got = ops_ug._triton_kernel(*args, diagonal)
        expected = torch.ops.bnas_fast.unfolded_gram(*args, diagonal)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_no_examples():
    """N = 0: the empty sum, zeros of the right shape (no launch)."""
    x, factors, conv = _inputs(GEOMETRIES[0], torch.float32)
    got = triton_ug.unfolded_gram(x[:0], factors[:0], *conv_args(conv))
    assert got.shape == (6, 37, 37) and got.dtype == torch.float32 and not got.any()
    got = triton_ug.unfolded_gram(x[:0], factors[:0], *conv_args(conv), diagonal=True)
    assert got.shape == (6, 37) and not got.any()


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(stride=(2, 2)), ValueError, r"factors' output size 7x6 does not match the convolution's 4x3"),
        (dict(groups=5), ValueError, r"groups = 5 must divide"),
        (dict(kernel_size=(9, 9), padding=(0, 0), factors=torch.randn(3, 3, 6, 0, 0)), ValueError, r"kernel is larger than the padded input"),
        (dict(x=torch.randn(2, 4, 7, 6)), ValueError, r"factors has N = 3 but x has N = 2"),
        (dict(factors=torch.randn(3, 3, 6, 7, 6, dtype=torch.float64)), TypeError, r"factors has dtype"),
        (dict(padding=(2**62, 1), dilation=(2**62, 1)), ValueError, r"must be below 2\^31"),
    ],
)
def test_bad_geometry_is_caught_before_launch(change, error, pattern):
    """A direct op call on CUDA reaches the launcher unchecked: it repeats the C++ kernel's checks
    (the kernels would read out of bounds)."""
    x, factors, conv = _inputs(GEOMETRIES[0], torch.float32)
    x = change.pop("x", x)
    factors = change.pop("factors", factors)
    conv.update(change)
    with pytest.raises(error, match=pattern):
        triton_ug.unfolded_gram(x, factors, *conv_args(conv))
