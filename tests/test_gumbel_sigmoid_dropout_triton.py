"""The Triton gumbel_sigmoid_dropout kernels against bnas_fast.reference, run by Triton's interpreter
on CPU tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs each program in
Python, so the tensors here are small; the whole file takes half a minute to a minute.

The launchers are called directly (there is no CUDA device to dispatch a registered op to).

The noise: the kernels draw the same Philox words as reference.philox_bits, bit for bit
(test_philox_bits_match_reference), and turn them into float32 logistic noise with the same exact
conversions and correctly rounded division, but the float32 log is not correctly rounded, neither
numpy's (which the interpreter runs for tl.log) nor torch's: the two differ by up to 4 units in the
last place (test_noise_matches_reference). That few-ulp noise difference would dominate every
float64 comparison (it is ~1e-7 relative), so the comparisons of the math (test_matches_reference and
the tests after it) run the reference on the kernels' own noise: the ``same_noise`` fixture points
reference.logistic_noise to the kernels' (triton_gsd.logistic_noise, a launcher of the same
function). The tests of the last section use the reference untouched: the hard masks must match
exactly, and the soft values within the noise's rounding (END_TO_END).
"""

import math

import pytest

pytest.importorskip("triton")

import torch

from bnas_fast import reference
from bnas_fast.triton import gumbel_sigmoid_dropout as triton_gsd

# |actual - expected| <= atol + rtol |expected| with the same noise, chosen by the output's dtype;
# the atol of grad_drop_logit, a sum of n terms, is scaled by sqrt(n). float64 and float32: the
# kernels and the reference differ in operation order and in exp/sigmoid (the kernels use the stable
# e = exp(-|z|) form; torch its own sigmoid), a few ulp of values ~1 to 50. bfloat16/float16 are
# computed in float32 and rounded once; the interpreter's float32 -> bfloat16 cast may truncate
# instead of rounding to nearest, and two float32 values one ulp apart can round to neighbouring
# outputs: one unit in the last place, 2^-7 (bfloat16) or 2^-10 (float16) relative, hence rtol
# 1e-2 and 2e-3; the atol covers outputs that are near zero.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-3},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
}

# End to end (the reference's own noise): the noise differs by up to 4 ulp of float32, 5e-7 |L|,
# which moves z = (lambda + L) / temperature by 5e-7 |L| / temperature and the soft keep s (and the
# slope s (1 - s)) by at most that relatively: below 1e-5 for |L| < 12 at temperature 0.6 (|L| > 12
# has probability 1e-5 per unit). A float32-sized tolerance for every dtype; the errors measured
# here are a few percent of it.
END_TO_END = {"rtol": 1e-5, "atol": 1e-5}

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
MODES = [0, 1, 2]
# (per_element, group_size): per element with one logit per channel or per pair of channels; per
# channel (group_size 1) and per group of 2 or 3 channels (C = 6).
LAYOUTS = [(True, 1), (True, 2), (False, 1), (False, 2), (False, 3)]
TEMPERATURE = 0.6
SEED_OFFSET = (2**33 + 12345, 2**32 - 3)  # seed above 2^32; the counters cross 2^32 (hi word 1)


def dtype_id(dtype):
    return str(dtype)[6:]


def layout_id(layout):
    per_element, group_size = layout
    return f"{'element' if per_element else 'group'}{group_size}"


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.fixture
def same_noise(monkeypatch):
    """The reference draws its noise with the kernels' logistic_noise (see the module docstring)."""
    monkeypatch.setattr(reference, "logistic_noise", triton_gsd.logistic_noise)


def make_inputs(shape, group_size, dtype, seed=0):
    """x [B, C, P] (mean 0.5, std 2), drop_logit [C / group_size] (p from ~0.05 to ~0.95), grad_y."""
    gen = torch.Generator().manual_seed(seed)
    B, C, P = shape
    x = (2 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    drop_logit = (1.2 * torch.randn(C // group_size, generator=gen, dtype=torch.float64)).to(dtype)
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, drop_logit, grad_y


def seed_offset(seed, offset):
    return torch.tensor([seed, offset], dtype=torch.int64)


def assert_close(actual, expected, what, terms=1, tol=None):
    """Same shape and dtype, and close within tol (TOLERANCES[dtype] by default); ``terms`` is the
    number of values summed into each element (the rounding of a sum grows like sqrt(terms))."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tol = tol or TOLERANCES[expected.dtype]
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * math.sqrt(terms), msg=lambda m: f"{what}: {m}"
    )


def check(
    x, drop_logit, grad_y, so, group_size, per_element, rescale, mode, temperature=TEMPERATURE, tol=None
):
    """Forward and both gradients of the launchers against the reference on one set of inputs."""
    B, C, P = x.shape
    args = (so, temperature, group_size, per_element, rescale, mode)
    tag = f"{shape_id(x.shape)} {layout_id((per_element, group_size))} mode {mode} rescale {rescale}"

    y = triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, *args)
    assert y.is_contiguous()
    assert_close(y, reference.gumbel_sigmoid_dropout(x, drop_logit, *args), f"{tag}: y", tol=tol)

    grad_x, grad_logit = triton_gsd.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    ref_grad_x, ref_grad_logit = reference.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    assert grad_x.is_contiguous()
    assert_close(grad_x, ref_grad_x, f"{tag}: grad_x", tol=tol)
    assert_close(grad_logit, ref_grad_logit, f"{tag}: grad_drop_logit", terms=B * P * group_size, tol=tol)


# ----------------------------------------------------------------------------------------------
# The random numbers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,offset,n",
    [
        (0, 0, 1),
        (12345, 0, 37),  # n not a multiple of 4: the last quad is cut
        (2**33 + 7, 5, 64),  # a seed above 2^32: the hi key word
        (7, 2**32 - 3, 41),  # counters 2^32 - 3 .. 2^32 + 7: the hi counter word goes 0 -> 1
        (2**31 + 1, 2**31 - 2, 20),  # both just around 2^31 (int32 vs int64 kernel arguments)
        (-3, 2**40 + 1, 9),  # a negative seed: its two's complement words, as in the reference
        (2**63 - 1, 2**62, 1000),  # the largest seed; several programs
    ],
)
def test_philox_bits_match_reference(seed, offset, n):
    """The kernels' Philox words (the helper launcher runs the kernels' own _philox_quads and lane
    pick) equal reference.philox_bits bit for bit."""
    got = triton_gsd.philox_bits(seed, offset, n)
    expected = reference.philox_bits(seed, offset, n)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got, expected)
    assert bool(((got >= 0) & (got < 2**32)).all())


def test_noise_matches_reference():
    """The kernels' logistic noise equals reference.logistic_noise up to the float32 log's rounding
    (at most 4 ulp: numpy's float32 log, run by the interpreter, is not correctly rounded, nor is
    torch's), including both ends of the word range, where it is finite."""
    ends = torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    bits = torch.cat([ends, reference.philox_bits(99, 3, 20000)])
    got = triton_gsd.logistic_noise(bits)
    expected = reference.logistic_noise(bits)
    assert got.dtype == torch.float32 and bool(got.isfinite().all())
    assert torch.equal(got.sign(), expected.sign())
    ulps = (got.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 4, f"noise differs by {int(ulps.max())} ulp"
    # w = 0 and w = 2^32 - 1 (the first and last of ``ends``): a / b = 2^-33 and 2^33 exactly
    log_2_33 = 33 * math.log(2)
    assert abs(float(got[0]) + log_2_33) < 1e-5 and abs(float(got[len(ends) - 1]) - log_2_33) < 1e-5


# ----------------------------------------------------------------------------------------------
# The math, on the kernels' noise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"mode{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(same_noise, dtype, mode, rescale, layout):
    """Every dtype, mode, rescale and layout on two shapes: rows of P = 5 (element rows starting at
    every lane of a quad) and of P = 33 with an odd batch."""
    per_element, group_size = layout
    so = seed_offset(*SEED_OFFSET)
    for shape in [(3, 6, 5), (7, 6, 33)]:
        x, drop_logit, grad_y = make_inputs(shape, group_size, dtype, seed=sum(shape) + mode)
        check(x, drop_logit, grad_y, so, group_size, per_element, rescale, mode)


SHAPES = [(B, C, P) for B in (1, 3, 7) for C in (1, 6) for P in (1, 5, 33)]


@pytest.mark.parametrize(
    "shape,layout",
    [(s, lay) for s in SHAPES for lay in LAYOUTS if s[1] % lay[1] == 0],
    ids=lambda v: shape_id(v) if isinstance(v[0], int) and len(v) == 3 else layout_id(v),
)
def test_shapes(same_noise, shape, layout):
    """Odd shapes (B = 1, 3, 7; C = 1, 6; P = 1, 5, 33) in float64, every mode (rescale alternating;
    test_matches_reference covers every pair). P = 1 per element takes the unit-row kernel (each
    value a unit), P > 1 the element-row kernel."""
    per_element, group_size = layout
    x, drop_logit, grad_y = make_inputs(shape, group_size, torch.float64, seed=sum(shape))
    so = seed_offset(5, 77)
    for mode, rescale in [(0, True), (1, False), (2, True)]:
        check(x, drop_logit, grad_y, so, group_size, per_element, rescale, mode)


@pytest.mark.parametrize("layout", LAYOUTS[:4], ids=layout_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_long_rows(same_noise, dtype, layout):
    """P = 1099, longer than a tile: an element row spans up to 276 quads > 256 = MAX_TILE / 4 per
    step, a unit row 1099 or 2198 values > 256 per step (9 steps: two chunks of MAX_STEPS = 8 with
    group_size 2), so every row loops. P = 3 mod 4: rows start at every lane of a quad."""
    per_element, group_size = layout
    shape = (2, 2, 1099)
    plan = triton_gsd._plan(*shape, group_size, per_element)
    assert plan.length > (plan.block if plan.units else 4 * plan.block)
    x, drop_logit, grad_y = make_inputs(shape, group_size, dtype, seed=11)
    so = seed_offset(31, 2**32 + 5)
    for mode, rescale in [(0, True), (1, False), (2, True)]:
        check(x, drop_logit, grad_y, so, group_size, per_element, rescale, mode)


@pytest.mark.parametrize(
    "shape,layout,tiling",
    [
        # element rows: P = 33 spans up to 9 quads; BLOCK_Q = 4 (16 values per step), 3 steps in
        # chunks of 2: 2 chunks, one row per program
        ((3, 2, 33), (True, 1), (False, 1, 4, 2)),
        # element rows: P = 3 spans 1 or 2 quads (rows starting at lane 2 or 3), 2 rows per program
        # (the last program's second row padding)
        ((3, 3, 3), (True, 3), (False, 2, 2, 1)),
        # unit rows: L = 2 * 9 = 18 values, BLOCK_L = 4: 5 steps, chunks of 2 steps: 3 chunks
        ((5, 4, 9), (False, 2), (True, 1, 4, 3)),
        # unit rows of one value (per element, P = 1): 4 quads = 16 values per program
        ((7, 6, 1), (True, 2), (True, 4, 1, 1)),
    ],
    ids=["element-chunks", "element-rows-per-program", "unit-chunks", "unit-P1"],
)
def test_tiling(same_noise, monkeypatch, shape, layout, tiling):
    """A small MAX_TILE and MAX_STEPS: rows split in chunks over the second grid axis (partial sums of
    grad_drop_logit summed on the host), several rows per program, padding rows and quads."""
    monkeypatch.setattr(triton_gsd, "MAX_TILE", 16)
    monkeypatch.setattr(triton_gsd, "MAX_STEPS", 2)
    per_element, group_size = layout
    plan = triton_gsd._plan(*shape, group_size, per_element)
    assert (plan.units, plan.block_rows, plan.block, plan.grid[1]) == tiling
    x, drop_logit, grad_y = make_inputs(shape, group_size, torch.float64, seed=2)
    so = seed_offset(2**40 + 9, 3)
    for mode in MODES:
        check(x, drop_logit, grad_y, so, group_size, per_element, True, mode)


@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (-9, 2**32 - 2), (2**33 + 5, 123), (17, 2**40 + 3)],
    ids=["zero", "negative-seed-hi-crossing", "seed-above-2^32", "offset-above-2^32"],
)
def test_seeds_and_offsets(same_noise, seed, offset):
    """Nonzero seeds and offsets (hi key word, counters crossing 2^32) in both layouts."""
    so = seed_offset(seed, offset)
    for layout in [(True, 2), (False, 3)]:
        x, drop_logit, grad_y = make_inputs((3, 6, 5), layout[1], torch.float32, seed=3)
        for mode in MODES:
            check(x, drop_logit, grad_y, so, layout[1], layout[0], True, mode)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_temperatures(same_noise, temperature):
    """A near-hard temperature (sigmoid saturating: the stable form of soft (1 - soft)) and soft ones."""
    x, drop_logit, grad_y = make_inputs((3, 6, 5), 2, torch.float64, seed=4)
    so = seed_offset(8, 9)
    for per_element in (True, False):
        for mode in (0, 1):
            check(x, drop_logit, grad_y, so, 2, per_element, True, mode, temperature=temperature)


@pytest.mark.parametrize("drop_logit_value,temperature", [(80.0, 0.2), (87.5, 0.2), (87.5, 1.0)])
@pytest.mark.parametrize("layout", [(True, 1), (False, 1)], ids=layout_id)
def test_soft_mode_near_the_rescale_limit(same_noise, drop_logit_value, temperature, layout):
    """float32 kernels against the float64 reference with a drop logit near the float32 limit of
    the rescale (87.7): soft keep underflows while keep * (1 + e^lambda) is of order 1. Multiplying
    by scale after summing once gave a NaN grad_lambda here."""
    per_element, group_size = layout
    x, _, grad_y = make_inputs((4, 2, 64), group_size, torch.float32, seed=7)
    drop_logit = torch.full((2,), drop_logit_value)
    so = seed_offset(2**33 + 12345, 2**32 - 3)
    for mode in (0, 1):
        args = (so, temperature, group_size, per_element, True, mode)
        y = triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, *args)
        _, grad_logit = triton_gsd.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
        y64 = reference.gumbel_sigmoid_dropout(x.double(), drop_logit.double(), *args)
        _, grad_logit64 = reference.gumbel_sigmoid_dropout_backward(grad_y.double(), x.double(), drop_logit.double(), *args)
        size = max(float(y64.abs().max()), 1.0)
        assert float((y.double() - y64).abs().max()) < 1e-5 * size, f"mode {mode}: y"
        # grad_lambda sums terms of the size of y (soft) or of grad_lambda itself (straight-through,
        # where y is 0): float32 leaves ~1e-6 of them
        size = max(size, float(grad_logit64.abs().max()))
        assert torch.isfinite(grad_logit).all(), f"mode {mode}: grad_lambda {grad_logit}"
        assert float((grad_logit.double() - grad_logit64).abs().max()) < 1e-5 * size, f"mode {mode}: grad_lambda"


def test_gradients_match_autograd(same_noise):
    """The backward equals autograd of the reference forward (not only the explicit formulas)."""
    so = seed_offset(123, 456)
    for per_element, group_size in [(True, 2), (False, 3)]:
        x, drop_logit, grad_y = make_inputs((3, 6, 5), group_size, torch.float64, seed=5)
        for mode in MODES:
            for rescale in (True, False):
                xr = x.clone().requires_grad_()
                lr = drop_logit.clone().requires_grad_()
                args = (so, TEMPERATURE, group_size, per_element, rescale, mode)
                y = reference.gumbel_sigmoid_dropout(xr, lr, *args)
                gx, gl = torch.autograd.grad(y, (xr, lr), grad_y, allow_unused=True)
                gl = torch.zeros_like(drop_logit) if gl is None else gl  # mode 2 without rescale
                got = triton_gsd.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
                tag = f"mode {mode} rescale {rescale}"
                assert_close(got[0], gx, f"{tag}: grad_x")
                assert_close(got[1], gl, f"{tag}: grad_drop_logit", terms=3 * 5 * group_size)


def test_non_contiguous_inputs(same_noise):
    """Strided x, grad_y and drop_logit are read through contiguous copies."""
    x, drop_logit, grad_y = make_inputs((6, 5, 4), 1, torch.float64, seed=6)
    xt, gt = x.transpose(1, 2), grad_y.transpose(1, 2)  # [6, 4, 5]
    assert not xt.is_contiguous()
    logit = torch.randn(8, dtype=torch.float64)[::2]
    for per_element in (True, False):
        check(xt, logit, gt, seed_offset(1, 2), 1, per_element, True, 0)


@pytest.mark.parametrize("shape", [(0, 6, 5), (3, 6, 0)], ids=["B0", "P0"])
def test_empty(shape):
    """No launch for an empty tensor: an empty y and grad_x, and a zero grad_drop_logit."""
    x, drop_logit, grad_y = make_inputs(shape, 2, torch.float32)
    so = seed_offset(1, 2)
    y = triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, so, TEMPERATURE, 2, True, True, 0)
    assert y.shape == shape and y.dtype == x.dtype
    grad_x, grad_logit = triton_gsd.gumbel_sigmoid_dropout_backward(
        grad_y, x, drop_logit, so, TEMPERATURE, 2, False, True, 1
    )
    assert grad_x.shape == shape
    assert grad_logit.shape == (3,) and bool((grad_logit == 0).all())


# ----------------------------------------------------------------------------------------------
# End to end: the reference's own noise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference_end_to_end(dtype):
    """The untouched reference: every mode and layout within the noise's rounding (END_TO_END, or
    TOLERANCES for the low-precision dtypes, whose own rounding is larger)."""
    tol = {k: max(END_TO_END[k], TOLERANCES[dtype][k]) for k in END_TO_END}
    so = seed_offset(*SEED_OFFSET)
    for per_element, group_size in LAYOUTS:
        x, drop_logit, grad_y = make_inputs((3, 6, 33), group_size, dtype, seed=7)
        for mode in MODES:
            check(x, drop_logit, grad_y, so, group_size, per_element, True, mode, tol=tol)


def hard_keep(x_shape, drop_logit, so, group_size, per_element):
    """The kernels' hard mask in drop_logit's dtype: mode 2 without rescale on x = 1 gives y = keep,
    0 or 1 exactly."""
    ones = torch.ones(x_shape, dtype=drop_logit.dtype)
    args = (so, TEMPERATURE, group_size, per_element, False, 2)
    return triton_gsd.gumbel_sigmoid_dropout(ones, drop_logit, *args)


def unit_values(t, group_size, per_element):
    """One value per mask unit of a [B, C, P] tensor: every value per element, x[b, g group_size, 0]
    for the unit (b, g) per group."""
    return t if per_element else t[:, ::group_size, :1]


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((8, 6, 2048), (True, 2)),
        ((4, 6, 4095), (True, 1)),
        ((4096, 6, 1), (False, 1)),
        ((8192, 6, 1), (False, 3)),
    ],
    ids=["element2", "element1-odd-P", "group1", "group3"],
)
def test_hard_masks_match_reference(shape, layout):
    """Mode 2's masks equal the untouched reference's, unit for unit, on 16384 to 98304 units: the
    words are identical and a few-ulp difference of the noise flips a unit only if lambda + L is
    within those ulp of 0 (probability ~1e-8 per unit), so at most 1 mismatch per 1e5 units is
    allowed (0 here) and 0 are expected. The keep rate of each group is 1 - p within 5 standard
    deviations."""
    per_element, group_size = layout
    B, C, P = shape
    G = C // group_size
    so = seed_offset(2**35 + 1, 2**32 - 100)
    for dtype in (torch.float32, torch.float64):
        drop_logit = torch.linspace(-2.0, 2.0, G, dtype=dtype)
        got = hard_keep(shape, drop_logit, so, group_size, per_element)
        assert bool(((got == 0) | (got == 1)).all())
        _, expected = reference.gumbel_sigmoid_keep(
            torch.ones(shape, dtype=dtype), drop_logit, so, TEMPERATURE, group_size, per_element
        )
        got_units = unit_values(got, group_size, per_element)
        expected_units = unit_values(expected.expand(shape), group_size, per_element)
        mismatches = int((got_units != expected_units).sum())
        units = got_units.numel()
        assert mismatches <= units // 10**5, f"{dtype}: {mismatches} of {units} units differ"

        # Keep rate of each group against 1 - p = sigmoid(-lambda), over its n units.
        rate = got_units.reshape(B, G, -1).double().mean((0, 2))
        n = units // G
        q = torch.sigmoid(-drop_logit.double())
        assert bool(((rate - q).abs() <= 5 * (q * (1 - q) / n).sqrt()).all()), f"keep rates {rate} vs {q}"


def test_deterministic_and_seeded():
    """The same (seed, offset) gives bitwise-identical outputs and gradients; another seed, or another
    offset, gives another mask (with p = 1/2, two independent masks differ in half of the units)."""
    x, drop_logit, grad_y = make_inputs((16, 6, 33), 2, torch.float32, seed=8)
    so = seed_offset(2024, 2**32 - 1)
    for per_element in (True, False):
        args = (TEMPERATURE, 2, per_element, True, 1)
        first = triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, so, *args)
        second = triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, so.clone(), *args)
        assert torch.equal(first, second)
        g1 = triton_gsd.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, so, *args)
        g2 = triton_gsd.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, so, *args)
        assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])

        half = torch.zeros_like(drop_logit)
        units = unit_values(hard_keep(x.shape, half, so, 2, per_element), 2, per_element)
        for other in (seed_offset(2025, 2**32 - 1), seed_offset(2024, 2**32 + 1000)):
            other_units = unit_values(hard_keep(x.shape, half, other, 2, per_element), 2, per_element)
            differ = (units != other_units).float().mean().item()
            assert differ > 0.3, f"masks differ in only {differ:.0%} of units"


def _bad(call, pattern, error=ValueError):
    """A case: ``call`` must raise ``error`` matching ``pattern`` ("^op: argument ..."); id "op-argument"."""
    op, message = pattern[1:].split(": ", 1)
    return pytest.param(call, error, pattern, id=f"{op}-{message.split()[0]}")


# Valid arguments: x [B, C, P] = [2, 6, 5], group_size = 2 (3 logits); then temperature, group_size,
# per_element, rescale, mode.
_X, _L, _SO = torch.randn(2, 6, 5), torch.randn(3), torch.tensor([1, 2])
_CFG = (TEMPERATURE, 2, False, True, 0)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L[:2], _SO, *_CFG),
             r"^gumbel_sigmoid_dropout: drop_logit must be \[C / group_size\] = \[3\]"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L, _SO, TEMPERATURE, 4, False, True, 0),
             r"^gumbel_sigmoid_dropout: group_size = 4 must be >= 1 and divide C = 6"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X[0], _L, _SO, *_CFG),
             r"^gumbel_sigmoid_dropout: x must be \[B, C, P\], got \(6, 5\)"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L.double(), _SO, *_CFG),
             r"^gumbel_sigmoid_dropout: drop_logit has dtype torch.float64 but x has dtype", TypeError),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L, _SO[:1], *_CFG),
             r"^gumbel_sigmoid_dropout: seed_offset must be an int64 tensor of 2 entries", TypeError),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L, _SO, 0.0, 2, False, True, 0),
             r"^gumbel_sigmoid_dropout: temperature must be > 0"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout(_X, _L, _SO, TEMPERATURE, 2, False, True, 3),
             r"^gumbel_sigmoid_dropout: mode must be 0 \(soft\), 1 \(straight-through\) or 2 \(hard\)"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout_backward(_X[:1], _X, _L, _SO, *_CFG),
             r"^gumbel_sigmoid_dropout_backward: grad_y must have x's shape \(2, 6, 5\), got \(1, 6, 5\)"),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout_backward(_X.double(), _X, _L, _SO, *_CFG),
             r"^gumbel_sigmoid_dropout_backward: grad_y has dtype torch.float64", TypeError),
        _bad(lambda: triton_gsd.gumbel_sigmoid_dropout_backward(_X, _X, _L[:2], _SO, *_CFG),
             r"^gumbel_sigmoid_dropout_backward: drop_logit must be \[C / group_size\] = \[3\]"),
        _bad(lambda: triton_gsd.logistic_noise(torch.tensor([1, 2], dtype=torch.int32)),
             r"^logistic_noise_of_words: words must be an int64 tensor", TypeError),
    ],
)
def test_bad_arguments_are_caught_before_launch(call, error, pattern):
    """A direct op call on CUDA reaches the launchers unchecked: they repeat the C++ kernel's checks
    (a drop_logit shorter than C / group_size would be read out of bounds)."""
    with pytest.raises(error, match=pattern):
        call()
