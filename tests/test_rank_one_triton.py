"""The Triton rank-one kernels against bnas_fast.reference, run by Triton's interpreter on CPU
tensors (conftest.py sets TRITON_INTERPRET=1 before triton is imported). The interpreter runs each
program in Python, so the shapes are tests/test_rank_one.py's small geometries.

The launchers are called directly (there is no CUDA device to dispatch the registered ops to);
test_op_path_functions also calls the functions that bnas_fast.ops.rank_one registers for CUDA.
"""

import importlib

import pytest

pytest.importorskip("triton")

import torch

from bnas_fast import reference
from bnas_fast.triton import rank_one as triton_rank_one

from _tolerance import assert_within
from test_rank_one import GEOMETRIES, TOLERANCES, _inputs, _rank_one, _ref_args, _subnormal_rank_one, dtype_id

ops_rank_one = importlib.import_module("bnas_fast.ops.rank_one")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
def test_input_grad_matches_reference(dtype, geometry):
    coeffs, maps, weight, conv = _inputs(geometry, dtype)
    got = triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    assert got.dtype == dtype and got.is_contiguous()
    assert_within(got, expected, TOLERANCES[dtype], "input gradient")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
def test_split_matches_reference(dtype, geometry):
    factors = _rank_one(geometry, dtype)
    coeffs, maps, ok = triton_rank_one.rank_one_split(factors)
    expected_coeffs, expected_maps, expected_ok = reference.rank_one_split(factors)
    assert bool(ok) and bool(expected_ok)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    # the kernel scales by the largest magnitude, the reference by a power of two: last-bit differences
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(coeffs, expected_coeffs, rtol=16 * eps, atol=16 * eps)


@pytest.mark.parametrize("case", ["tiny", "huge", "subnormal"])
def test_split_of_factors_far_from_one(case):
    factors = {"tiny": lambda: _rank_one(GEOMETRIES[0], torch.float32, 1e-30),
               "huge": lambda: _rank_one(GEOMETRIES[0], torch.float32, 1e30),
               "subnormal": lambda: _subnormal_rank_one(GEOMETRIES[0])}[case]()
    coeffs, maps, ok = triton_rank_one.rank_one_split(factors)
    assert bool(ok)
    torch.testing.assert_close(coeffs[..., None, None] * maps, factors, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spoil", ["random", "one-row-off", "nan", "inf"])
def test_split_refuses_factors_that_are_not_of_rank_one(spoil):
    factors = _rank_one(GEOMETRIES[0], torch.float64)
    if spoil == "random":
        factors = torch.randn_like(factors)
    elif spoil == "one-row-off":
        factors[1, 1, 2, 0, 0] += 1e-6 * float(factors[1, 1, 2].abs().max())
    else:
        factors[2, 1, 3, 1, 1] = float(spoil)
    coeffs, maps, ok = triton_rank_one.rank_one_split(factors)
    assert not bool(ok) and not bool(coeffs.any()) and not bool(maps.any())


def test_strided_factors_are_read_through_their_strides():
    factors = _rank_one(GEOMETRIES[1], torch.float64)
    n_major = factors.transpose(0, 1).contiguous().transpose(0, 1)
    got, expected = triton_rank_one.rank_one_split(n_major), triton_rank_one.rank_one_split(factors)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_op_path_functions():
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[1], torch.float64)
    args = tuple(list(v) if isinstance(v, tuple) else v for v in _ref_args(conv))
    torch.testing.assert_close(ops_rank_one._triton_input_grad(coeffs, maps, weight, *args),
                               torch.ops.bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, *args))
    factors = _rank_one(GEOMETRIES[1], torch.float64)
    for a, b in zip(ops_rank_one._triton_split(factors), torch.ops.bnas_fast.rank_one_split(factors)):
        torch.testing.assert_close(a, b)


def test_launchers_check_what_the_kernels_index():
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[0], torch.float32)
    with pytest.raises(ValueError, match=r"is not the convolution's output size"):
        triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, (8, 6), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match=r"groups = 4 must divide C_out = 6"):
        triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, (7, 6), (1, 1), (1, 1), (1, 1), 4)
    with pytest.raises(TypeError, match=r"must share a dtype"):
        triton_rank_one.rank_one_conv_input_grad(coeffs, maps.double(), weight, (7, 6), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match=r"factors must be \[K, N, C_out, Ho, Wo\]"):
        triton_rank_one.rank_one_split(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"must be below 2\^31"):
        triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, (7, 6), (1, 1), (2**62, 1), (2**62, 1), 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_non_finite_weight_reaches_only_the_pixels_it_touches(stride):
    """The masked load's 0 times a NaN weight gave NaN at pixels that weight never touches
    (review of 2026-12-02); the kernel now selects 0 for those taps, as the reference skips them."""
    Ho = (5 - 1) // stride + 1
    coeffs = torch.tensor([[[1.0]], [[-2.0]]], dtype=torch.float64)
    maps = torch.rand(1, 1, Ho, Ho, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    weight = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 0] = float("nan")
    args = ((5, 5), (stride, stride), (1, 1), (1, 1), 1)
    got = triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, *args)
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, *args)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected)) and bool(torch.isfinite(got).any())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_no_output_channels_give_zero_gradients():
    Ho = (6 - 1) // 2 + 1
    got = triton_rank_one.rank_one_conv_input_grad(torch.zeros(3, 2, 0), torch.zeros(2, 0, Ho, Ho),
                                                   torch.zeros(0, 4, 3, 3), (6, 6), (2, 2), (1, 1), (1, 1), 1)
    assert got.shape == (3, 2, 4, 6, 6) and not bool(got.any())


def test_factors_in_several_blocks(monkeypatch):
    """K = 9 factors in blocks of 4 (the third block part full): program_id(2) > 0 and its mask."""
    monkeypatch.setattr(triton_rank_one, "MAX_BLOCK_K", 4)
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[5], torch.float64)
    coeffs = torch.randn(9, *coeffs.shape[1:], dtype=torch.float64)
    got = triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    assert_within(got, expected, TOLERANCES[torch.float64], "input gradient")


def test_a_non_finite_value_among_zeros_is_refused():
    factors = torch.zeros(2, 1, 1, 2, 2, dtype=torch.float64)
    factors[0, 0, 0, 0, 0] = float("nan")
    assert not bool(triton_rank_one.rank_one_split(factors)[2])


def test_a_split_too_large_for_one_tile_runs_the_reference(monkeypatch):
    monkeypatch.setattr(triton_rank_one, "MAX_SPLIT_TILE", 16)
    factors = _rank_one(GEOMETRIES[0], torch.float64)  # a 16 x 64 tile per (n, o)
    got = triton_rank_one.rank_one_split(factors)
    expected = reference.rank_one_split(factors)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
