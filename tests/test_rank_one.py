"""Test ladder for the rank-one ops (issue 6): rank_one_split and rank_one_conv_input_grad, the
registered ops (C++ on CPU) against bnas_fast.reference over geometries and dtypes, the reference
against autograd of conv2d, opcheck, torch.compile(fullgraph=True), determinism across thread
counts, bad input. The ops have no backward (they carry curvature factors), so there is no
gradcheck. GGNBlocks' use of them is tested in tests/test_curvature.py.
"""

import pytest
import torch

import bnas_fast
from bnas_fast import reference

from _threads import num_threads
from _tolerance import assert_within

# Sums of O * taps products of O(1) numbers, in a different order from ATen's transposed convolution.
TOLERANCES = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}

# (K, N, C_out, C_in / groups, H, W, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (9, 3, 6, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # the common case: "same" 3x3
    (13, 2, 4, 2, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), 2),  # two blocks of factors (12 + 1); dilation; groups
    (1, 2, 4, 1, 5, 5, (1, 3), (1, 1), (0, 1), (1, 1), 4),  # one factor; depthwise; non-square kernel
    (5, 2, 3, 2, 11, 7, (5, 3), (2, 1), (2, 1), (1, 2), 1),  # stride 2 (ATen's transposed convolution)
    (3, 2, 3, 2, 4, 2, (3, 3), (1, 1), (3, 3), (1, 1), 1),  # padding beyond the kernel's reach
    (12, 2, 3, 2, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # a 1x1 image, a full block of 12
    (4, 2, 5, 3, 6, 9, (2, 4), (1, 1), (0, 0), (1, 1), 1),  # "valid": the map is smaller than the input
    (2, 1, 2, 2, 17, 3, (3, 3), (2, 3), (1, 0), (1, 1), 1),  # strides that skip input rows and columns
]


def _output_size(H, W, k, s, p, d):
    return (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1


def _inputs(geometry, dtype, seed=0):
    K, N, O, Cg, H, W, k, s, p, d, g = geometry
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = _output_size(H, W, k, s, p, d)
    coeffs = torch.randn(K, N, O, generator=gen, dtype=torch.float64).to(dtype)
    maps = torch.randn(N, O, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(O, Cg, *k, generator=gen, dtype=torch.float64).to(dtype)
    return coeffs, maps, weight, dict(input_size=(H, W), stride=s, padding=p, dilation=d, groups=g)


def _ref_args(conv):
    return tuple(conv[name] for name in ("input_size", "stride", "padding", "dilation", "groups"))


def dtype_id(dtype):
    return str(dtype)[6:]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
def test_input_grad_matches_reference(dtype, geometry):
    coeffs, maps, weight, conv = _inputs(geometry, dtype)
    got = bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, **conv)
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    assert got.dtype == dtype and got.is_contiguous()
    assert_within(got, expected, TOLERANCES[dtype], "input gradient")


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_reference_input_grad_is_the_vjp_of_conv2d(geometry):
    """The specification itself: E[k, n] = d(<S[k, n], conv2d(x)>) / dx, from plain autograd."""
    coeffs, maps, weight, conv = _inputs(geometry, torch.float64)
    K, N = coeffs.shape[:2]
    x = torch.randn(N, weight.shape[1] * conv["groups"], *conv["input_size"], dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, weight, None, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    expected = torch.stack([torch.autograd.grad(y, x, coeffs[k][:, :, None, None] * maps, retain_graph=True)[0] for k in range(K)])
    got = reference.rank_one_conv_input_grad(coeffs, maps, weight, *_ref_args(conv))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _rank_one(geometry, dtype, scale=1.0, seed=1):
    """Factors [K, N, O, Ho, Wo] of rank one per (n, o), with ReLU-like zeros in the maps, a dead
    unit (every factor of (n=0, o=0) zero) and one zero factor, scaled by ``scale``."""
    coeffs, maps, _, _ = _inputs(geometry, torch.float64, seed)
    maps = maps * (maps > -0.3)
    coeffs[:, 0, 0] = 0
    coeffs[0, -1, -1] = 0
    return (coeffs[..., None, None] * maps * scale).to(dtype)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
def test_split_matches_reference_and_rebuilds_the_factors(dtype, geometry):
    factors = _rank_one(geometry, dtype)
    split = bnas_fast.rank_one_split(factors)
    assert split is not None
    coeffs, maps = split
    expected_coeffs, expected_maps, ok = reference.rank_one_split(factors)
    assert bool(ok)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)  # a copy of the same factor
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(coeffs, expected_coeffs, rtol=8 * eps, atol=8 * eps)
    rebuilt = coeffs[..., None, None] * maps
    torch.testing.assert_close(rebuilt, factors, rtol=16 * eps, atol=16 * eps * float(factors.abs().max()))
    assert bool((maps[0, 0] == 0).all()) and bool((coeffs[:, 0, 0] == 0).all())  # the dead unit


def _subnormal_rank_one(geometry):
    """float32 factors of rank one near 2^-140 (subnormal): small integers times 2^-140, so that
    every product is exact (rounded subnormals would not be of rank one any more)."""
    K, N, O = geometry[:3]
    Ho, Wo = _output_size(*geometry[4:10])
    gen = torch.Generator().manual_seed(3)
    coeffs = torch.randint(-3, 4, (K, N, O, 1, 1), generator=gen).double()
    coeffs[:, 0, 0] = 0
    maps = torch.randint(-3, 4, (N, O, Ho, Wo), generator=gen).double()
    return (coeffs * maps * 2.0**-140).float()


@pytest.mark.parametrize("scale", [1e-30, 1e30, "subnormal"])
def test_split_of_factors_far_from_one(scale):
    """Squared norms of 1e-30 (and of subnormal float32 factors) underflow unless the test scales
    each (n, o) first; 1e30 would overflow."""
    if scale == "subnormal":
        factors = _subnormal_rank_one(GEOMETRIES[0])
        assert float(factors.abs().max()) < torch.finfo(torch.float32).tiny
    else:
        factors = _rank_one(GEOMETRIES[0], torch.float32, scale)
    split = bnas_fast.rank_one_split(factors)
    assert split is not None and bool(reference.rank_one_split(factors)[2])
    coeffs, maps = split
    assert bool((maps.abs().amax((2, 3)) > 0).sum() > 0)
    # the largest factor of every live (n, o) is its own map (coefficient 1)
    live = factors.abs().amax((0, 3, 4)) > 0
    assert bool((coeffs.abs().amax(0)[live] == 1).all())


@pytest.mark.parametrize(
    "spoil",
    ["random", "one-row-off", "nan", "inf"],
)
def test_split_refuses_factors_that_are_not_of_rank_one(spoil):
    factors = _rank_one(GEOMETRIES[0], torch.float64)
    if spoil == "random":
        factors = torch.randn_like(factors)
    elif spoil == "one-row-off":  # one (k, n, o) off the common map by 1e-6 of its size
        factors[1, 1, 2, 0, 0] += 1e-6 * float(factors[1, 1, 2].abs().max())
    else:
        factors[2, 1, 3, 1, 1] = float(spoil)
    assert bnas_fast.rank_one_split(factors) is None
    coeffs, maps, ok = torch.ops.bnas_fast.rank_one_split(factors)
    assert not bool(ok) and not bool(coeffs.any()) and not bool(maps.any())
    assert not bool(reference.rank_one_split(factors)[2])


def test_split_reads_factors_through_their_strides():
    factors = _rank_one(GEOMETRIES[1], torch.float64)
    expected = bnas_fast.rank_one_split(factors)
    wide = torch.zeros(factors.shape[:3] + (factors.shape[3], factors.shape[4] * 2), dtype=factors.dtype)
    wide[..., ::2] = factors  # maps not contiguous: copied first
    n_major = factors.transpose(0, 1).contiguous().transpose(0, 1)  # contiguous maps, other order: read in place
    for view in (wide[..., ::2], n_major):
        got = bnas_fast.rank_one_split(view)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_opcheck():
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[0], torch.float32)
    args = (coeffs, maps, weight) + tuple(list(v) if isinstance(v, tuple) else v for v in _ref_args(conv))
    torch.library.opcheck(torch.ops.bnas_fast.rank_one_conv_input_grad.default, args)
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[3], torch.float64)  # stride 2
    args = (coeffs, maps, weight) + tuple(list(v) if isinstance(v, tuple) else v for v in _ref_args(conv))
    torch.library.opcheck(torch.ops.bnas_fast.rank_one_conv_input_grad.default, args)
    torch.library.opcheck(torch.ops.bnas_fast.rank_one_split.default, (_rank_one(GEOMETRIES[0], torch.float32),))
    torch.library.opcheck(torch.ops.bnas_fast.rank_one_split.default, (torch.randn(3, 2, 4, 5, 5),))


def test_compile_fullgraph():
    torch._dynamo.reset()
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[0], torch.float32)
    factors = _rank_one(GEOMETRIES[0], torch.float32)

    def route(factors, weight):
        # the op itself: the public rank_one_split turns its flag into None on the host
        c, m, ok = torch.ops.bnas_fast.rank_one_split(factors)
        return bnas_fast.rank_one_conv_input_grad(c, m, weight, **conv) * ok

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(factors, weight), route(factors, weight))


def test_deterministic_across_thread_counts():
    coeffs, maps, weight, conv = _inputs((10, 6, 8, 4, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 2), torch.float32)
    factors = coeffs[..., None, None] * maps
    first = bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, **conv)
    first_split = bnas_fast.rank_one_split(factors)
    for threads in (1, 2):
        with num_threads(threads):  # every output is summed by one thread, in a fixed order: bitwise equal
            assert torch.equal(bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, **conv), first)
            assert all(torch.equal(a, b) for a, b in zip(bnas_fast.rank_one_split(factors), first_split))


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(coeffs=torch.randn(9, 3, 6).half()), TypeError, r"coeffs must be float32 or float64, got torch.float16"),
        (dict(maps=torch.randn(3, 6, 7, 6, dtype=torch.float64)), TypeError, r"maps has dtype torch.float64 but coeffs has dtype torch.float32"),
        (dict(weight=torch.randint(0, 2, (6, 4, 3, 3))), TypeError, r"weight must be float32 or float64"),
        (dict(coeffs=torch.randn(9, 3)), ValueError, r"need coeffs \[K, N, C_out\]"),
        (dict(maps=torch.randn(2, 6, 7, 6)), ValueError, r"maps \(2, 6, 7, 6\) does not match coeffs \(9, 3, 6\)"),
        (dict(weight=torch.randn(5, 4, 3, 3)), ValueError, r"weight has C_out = 5 but coeffs has C_out = 6"),
        (dict(groups=4), ValueError, r"groups must be a positive int that divides C_out = 6, got 4"),
        (dict(padding=-1), ValueError, r"padding must be an int >= 0"),
        (dict(input_size=(0, 6)), ValueError, r"input_size must be an int >= 1"),
        (dict(input_size=(9, 6)), ValueError, r"maps' size \(7, 6\) is not the convolution's output size"),
        (dict(stride=(1, 2.0)), ValueError, r"stride must be an int >= 1"),
        (dict(maps=torch.randn(3, 6, 7, 6)[..., :0]), ValueError, r"is not the convolution's output size"),
        (dict(weight=torch.randn(6, 4, 0, 3)), ValueError, r"weight has an empty kernel, \(0, 3\)"),
        (dict(padding=2**62), ValueError, r"padding must be below 2\^31, got 4611686018427387904"),
        (dict(dilation=(1, 2**31)), ValueError, r"dilation must be below 2\^31"),
        (dict(stride=2**64), ValueError, r"stride must be below 2\^31"),
    ],
)
def test_bad_input_names_the_argument(change, error, pattern):
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[0], torch.float32)
    coeffs, maps, weight = change.pop("coeffs", coeffs), change.pop("maps", maps), change.pop("weight", weight)
    conv.update(change)
    with pytest.raises(error, match=pattern):
        bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, **conv)


def test_split_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"rank_one_split: factors must be float32 or float64, got torch.bfloat16"):
        bnas_fast.rank_one_split(torch.randn(2, 2, 2, 3, 3).bfloat16())
    with pytest.raises(ValueError, match=r"rank_one_split: factors must be \[K, N, C_out, Ho, Wo\], got \(2, 2, 3, 3\)"):
        bnas_fast.rank_one_split(torch.randn(2, 2, 3, 3))
    with pytest.raises(TypeError, match=r"rank_one_split: factors must be a torch.Tensor"):
        bnas_fast.rank_one_split([[1.0]])


def test_direct_op_calls_are_checked_in_cpp():
    coeffs, maps, weight, _ = _inputs(GEOMETRIES[0], torch.float32)
    op = torch.ops.bnas_fast.rank_one_conv_input_grad
    with pytest.raises(ValueError, match=r"is not the convolution's output size for input_size \[8, 6\]"):
        op(coeffs, maps, weight, [8, 6], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"groups = 4 must divide C_out = 6"):
        op(coeffs, maps, weight, [7, 6], [1, 1], [1, 1], [1, 1], 4)
    with pytest.raises(ValueError, match=r"maps .* does not match coeffs"):
        op(coeffs, maps[:2], weight, [7, 6], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(TypeError, match=r"must share a dtype"):
        op(coeffs, maps.double(), weight, [7, 6], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"stride and dilation must be >= 1"):
        op(coeffs, maps, weight, [7, 6], [0, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"factors must be \[K, N, C_out, Ho, Wo\]"):
        torch.ops.bnas_fast.rank_one_split(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match=r"factors must be float32 or float64"):
        torch.ops.bnas_fast.rank_one_split(torch.randn(2, 3, 4, 1, 1).half())
    # geometry whose sums would overflow int64 (review of 2026-12-02: a "tap outside its plane" error named nothing)
    with pytest.raises(ValueError, match=r"padding must be below 2\^31"):
        op(coeffs, maps, weight, [7, 6], [1, 1], [2**62, 1], [2**62, 1], 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_weight_reaches_only_the_pixels_it_touches(stride, value):
    """A NaN or infinite weight times the zero padding of the stride-1 kernel's planes gave NaN at
    pixels that weight never touches (review of 2026-12-02); now the op gives the reference's
    pattern of non-finite values, at every stride."""
    K, N, O, C, H = 2, 1, 1, 1, 5
    coeffs = torch.tensor([[[1.0]], [[-2.0]]], dtype=torch.float64)
    Ho = (H - 1) // stride + 1
    maps = torch.rand(N, O, Ho, Ho, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    weight = torch.ones(O, C, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 0] = float(value)
    conv = dict(input_size=(H, H), stride=stride, padding=1, dilation=1, groups=1)
    got = bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, **conv)
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, (H, H), (stride, stride), (1, 1), (1, 1), 1)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected)) and bool(torch.isfinite(got).any())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("stride", [1, 2])
def test_no_output_channels_give_zero_gradients(stride):
    """C_out = 0: nothing to sum, zeros at every stride (ATen's transposed convolution refuses an
    empty weight, and stride 2 used to raise its message)."""
    Ho = (6 - 1) // stride + 1
    coeffs, maps, weight = torch.zeros(3, 2, 0), torch.zeros(2, 0, Ho, Ho), torch.zeros(0, 4, 3, 3)
    got = bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, (6, 6), stride, 1)
    expected = reference.rank_one_conv_input_grad(coeffs, maps, weight, (6, 6), (stride, stride), (1, 1), (1, 1), 1)
    for out in (got, expected):
        assert out.shape == (3, 2, 4, 6, 6) and not bool(out.any())


def test_empty_inputs_give_empty_outputs():
    coeffs, maps, weight, conv = _inputs(GEOMETRIES[0], torch.float32)
    assert bnas_fast.rank_one_conv_input_grad(coeffs[:0], maps, weight, **conv).shape == (0, 3, 4, 7, 6)
    split = bnas_fast.rank_one_split(torch.zeros(3, 0, 4, 5, 5))
    assert split is not None and split[0].shape == (3, 0, 4) and split[1].shape == (0, 4, 5, 5)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_value_among_zeros_is_not_a_dead_unit(value):
    """max() skips NaN: an (n, o) of zeros and one NaN must not pass for a dead unit (review of
    2026-12-02), in the split and in unfolded_gram's compression (whose blocks must then be NaN,
    as the reference's are)."""
    factors = torch.zeros(2, 1, 1, 2, 2, dtype=torch.float64)
    factors[0, 0, 0, 0, 0] = float(value)
    assert bnas_fast.rank_one_split(factors) is None
    assert not bool(reference.rank_one_split(factors)[2])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    blocks = bnas_fast.unfolded_gram(x, factors.transpose(0, 1), 1, 1, 0, 1, 1, True)
    assert not bool(torch.isfinite(blocks).all())


def test_reference_split_of_an_empty_batch():
    coeffs, maps, ok = reference.rank_one_split(torch.zeros(3, 0, 4, 5, 5))
    assert coeffs.shape == (3, 0, 4) and maps.shape == (0, 4, 5, 5) and bool(ok)


def test_split_of_no_factors_matches_the_op():
    """K = 0: the reference indexed factor 0 of none (review of 2026-12-02); now it gives what the
    C++ op gives: no coefficients, zero maps, a split that holds."""
    factors = torch.zeros(0, 2, 3, 4, 4)
    for got in (reference.rank_one_split(factors), torch.ops.bnas_fast.rank_one_split(factors)):
        assert got[0].shape == (0, 2, 3) and got[1].shape == (2, 3, 4, 4) and not bool(got[1].any()) and bool(got[2])
