"""The Triton depth_loglik kernels against bnas_fast.reference, run by Triton's interpreter on CPU
tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs each program
in Python, so the tensors here are small; the whole file takes about 15 s.
"""

import pytest

pytest.importorskip("triton")

import torch

from bnas_fast import reference
from bnas_fast.triton import depth_loglik as triton_depth_loglik

# float16 and bfloat16 accumulate in float32 and are rounded once, as the reference does, so they
# differ from it by at most one unit in the last place. For bfloat16 that unit is 2^-7 relative,
# and it is often reached: the interpreter's float32 -> bfloat16 cast truncates instead of rounding
# to nearest (as the GPU does). Hence rtol 1e-2 (> 2^-7) for bfloat16 and 2e-3 (> 2^-10) for
# float16; atol covers gradients near zero, where the float32 rounding of (1[c = y] - p) and of
# the summation order is large relative to the value.
TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},
}

# (D+1, B, C): a single depth, example and class; a typical small case; many depths and examples
# with a class count below the smallest power of two block; and C = 17 (BLOCK_C = 32, 15 padding
# columns).
SHAPES = [(1, 1, 1), (3, 7, 10), (21, 123, 3), (6, 5, 17)]


def shape_id(shape):
    return "x".join(map(str, shape))


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def make_inputs(shape, dtype, seed, zero_mass=False):
    """logits [D+1, B, C], targets [B], log_q [D+1] (a log-softmax), grad_out [B].

    With ``zero_mass``, depth 1 gets log_q = -inf: no posterior mass (the others are renormalised).
    With a single depth that leaves no mass at all (not a distribution, but the op accepts it: every
    depth is skipped and the output is 0).
    """
    depths, batch, classes = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    q_logits = torch.randn(depths, generator=gen)
    if zero_mass:
        q_logits[min(1, depths - 1)] = float("-inf")
    log_q = torch.log_softmax(q_logits, 0) if depths > 1 else q_logits
    log_q = log_q.to(dtype)
    grad_out = torch.randn(batch, generator=gen).to(dtype)
    return logits, targets, log_q, grad_out


def check_against_reference(logits, targets, log_q, grad_out, reference_logits=None):
    """Forward and backward of the launchers against the reference (evaluated on
    ``reference_logits`` when given, e.g. a clean copy of poisoned logits)."""
    ref_logits = logits if reference_logits is None else reference_logits
    out = triton_depth_loglik.depth_loglik(logits, targets, log_q)
    assert out.is_contiguous()
    assert_close(out, reference.depth_loglik(ref_logits, targets, log_q))

    grad_logits, grad_log_q = triton_depth_loglik.depth_loglik_backward(grad_out, logits, targets, log_q)
    ref_grad_logits, ref_grad_log_q = reference.depth_loglik_backward(grad_out, ref_logits, targets, log_q)
    assert grad_logits.is_contiguous()
    assert_close(grad_logits, ref_grad_logits)
    assert_close(grad_log_q, ref_grad_log_q)
    return out, grad_logits, grad_log_q


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_matches_reference(dtype, shape):
    check_against_reference(*make_inputs(shape, dtype, seed=sum(shape)))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_low_precision(dtype, shape):
    """float32 accumulation, rounded once to the input dtype (see TOLERANCES)."""
    check_against_reference(*make_inputs(shape, dtype, seed=sum(shape) + 1))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_zero_mass_depth_is_not_read(dtype, shape):
    """A depth with log_q = -inf holds NaN logits: they must not be read (the reference, which
    multiplies them by q = 0, would give NaN), the output is the reference's on clean logits, and
    that depth's gradient is exactly zero."""
    logits, targets, log_q, grad_out = make_inputs(shape, dtype, seed=sum(shape) + 2, zero_mass=True)
    dead = torch.isneginf(log_q)
    assert dead.sum() == 1
    poisoned = logits.clone()
    poisoned[dead] = float("nan")
    out, grad_logits, grad_log_q = check_against_reference(poisoned, targets, log_q, grad_out, logits)
    assert not out.isnan().any()
    assert (grad_logits[dead] == 0).all()
    assert (grad_log_q[dead] == 0).all()


def test_all_mass_at_one_depth():
    """q = one-hot: only that depth contributes; every other depth is skipped."""
    logits, targets, _, grad_out = make_inputs((4, 7, 10), torch.float64, seed=3)
    log_q = torch.full((4,), float("-inf"), dtype=torch.float64)
    log_q[2] = 0.0
    out, grad_logits, _ = check_against_reference(logits, targets, log_q, grad_out)
    expected = torch.log_softmax(logits[2], -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (grad_logits[[0, 1, 3]] == 0).all()


def test_large_logits_are_stable():
    """Logits of magnitude ~1e3 (exp overflows without the max shift) stay finite and exact."""
    logits, targets, log_q, grad_out = make_inputs((3, 7, 10), torch.float32, seed=4)
    logits = logits * 300
    out, grad_logits, grad_log_q = check_against_reference(logits, targets, log_q, grad_out)
    assert out.isfinite().all() and grad_logits.isfinite().all() and grad_log_q.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_non_contiguous_logits(dtype):
    """Logits read through their strides: a transposed view (examples outermost in memory) and a
    view whose classes are not contiguous (stride_c = B)."""
    depths, batch, classes = 3, 7, 10
    _, targets, log_q, grad_out = make_inputs((depths, batch, classes), dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    transposed = torch.randn(batch, depths, classes, generator=gen, dtype=dtype).transpose(0, 1)
    classes_strided = torch.randn(depths, classes, batch, generator=gen, dtype=dtype).permute(0, 2, 1)
    for logits in (transposed, classes_strided):
        assert logits.shape == (depths, batch, classes) and not logits.is_contiguous()
        check_against_reference(logits, targets, log_q, grad_out)
    # Non-contiguous targets, log_q and grad_out too.
    wide = torch.stack([targets, targets.flip(0)], 1)
    check_against_reference(
        transposed,
        wide[:, 0],
        torch.stack([log_q, log_q], 1)[:, 1],
        torch.stack([grad_out, grad_out], 1)[:, 0],
    )


@pytest.mark.parametrize(
    "max_tile,shape,block_b",
    [(16, (6, 123, 3), 4), (8, (3, 7, 17), 1)],
    ids=["4-per-program", "1-per-program"],
)
def test_many_programs(monkeypatch, max_tile, shape, block_b):
    """A batch split over many programs, the last one partial (123 = 30 * 4 + 3), so grad_log_q is
    reduced over programs; and BLOCK_C = 32 > MAX_TILE (one example per program)."""
    monkeypatch.setattr(triton_depth_loglik, "MAX_TILE", max_tile)
    assert triton_depth_loglik._blocks(shape[1], shape[2])[0] == block_b
    check_against_reference(*make_inputs(shape, torch.float64, seed=7, zero_mass=True))


@pytest.mark.parametrize("shape", [(3, 0, 5), (1, 0, 1)], ids=shape_id)
def test_empty_batch(shape):
    """B = 0: no launch, an empty output and gradient, and grad_log_q = 0 (an empty sum)."""
    logits, targets, log_q, grad_out = make_inputs(shape, torch.float32, seed=8)
    check_against_reference(logits, targets, log_q, grad_out)
    assert (triton_depth_loglik.depth_loglik_backward(grad_out, logits, targets, log_q)[1] == 0).all()


def test_backward_is_deterministic(monkeypatch):
    """grad_log_q is reduced from per-program partial sums without atomics: repeated runs agree bit
    for bit, with several programs contributing to every depth."""
    monkeypatch.setattr(triton_depth_loglik, "MAX_TILE", 16)
    logits, targets, log_q, grad_out = make_inputs((5, 37, 3), torch.float32, seed=9, zero_mass=True)
    assert triton_depth_loglik._blocks(37, 3)[2] > 1
    first = triton_depth_loglik.depth_loglik_backward(grad_out, logits, targets, log_q)
    for _ in range(2):
        again = triton_depth_loglik.depth_loglik_backward(grad_out, logits, targets, log_q)
        assert torch.equal(first[0], again[0])
        assert torch.equal(first[1], again[1])
    out = triton_depth_loglik.depth_loglik(logits, targets, log_q)
    assert torch.equal(out, triton_depth_loglik.depth_loglik(logits, targets, log_q))


def _bad(call, pattern, error=ValueError):
    """A case: ``call`` must raise ``error`` matching ``pattern`` ("^op: argument ..."); id "op-argument"."""
    op, message = pattern[1:].split(": ", 1)
    return pytest.param(call, error, pattern, id=f"{op}-{message.split()[0]}")


# Valid arguments: D+1 = 3, B = 2, C = 4.
_X, _Y, _G = torch.randn(3, 2, 4), torch.tensor([0, 3]), torch.randn(2)
_Q = torch.log_softmax(torch.randn(3), 0)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        _bad(lambda: triton_depth_loglik.depth_loglik(_X[:, :1], _Y, _Q),
             r"^depth_loglik: targets has 2 entries but logits has B = 1"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X, _Y[:1], _Q),
             r"^depth_loglik: targets has 1 entries but logits has B = 2"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X, _Y.int(), _Q),
             r"^depth_loglik: targets must be a 1-D int64 tensor"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X[:, :, 0], _Y, _Q),
             r"^depth_loglik: logits must be \[D\+1, B, C\], got \(3, 2\)"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X[:, :, :0], _Y, _Q),
             r"^depth_loglik: logits must have at least one class"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X, _Y, _Q[:2]),
             r"^depth_loglik: log_q must be \[D\+1\] = \[3\]"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X, _Y, _Q.double()),
             r"^depth_loglik: log_q has dtype torch.float64 but logits has torch.float32"),
        _bad(lambda: triton_depth_loglik.depth_loglik(_X.long(), _Y, _Q.long()),
             r"^depth_loglik: logits must be a float16, bfloat16, float32 or float64 tensor", TypeError),
        _bad(lambda: triton_depth_loglik.depth_loglik_backward(_G[:1], _X, _Y, _Q),
             r"^depth_loglik_backward: grad_out must be \[B\] = \[2\]"),
        _bad(lambda: triton_depth_loglik.depth_loglik_backward(_G.double(), _X, _Y, _Q),
             r"^depth_loglik_backward: grad_out has dtype torch.float64"),
        _bad(lambda: triton_depth_loglik.depth_loglik_backward(_G, _X, _Y[:1], _Q),
             r"^depth_loglik_backward: targets has 1 entries"),
        _bad(lambda: triton_depth_loglik.depth_loglik_backward(_G, _X, _Y, _Q[:2]),
             r"^depth_loglik_backward: log_q must be \[D\+1\] = \[3\]"),
    ],
)
def test_bad_arguments_are_caught_before_launch(call, error, pattern):
    """A direct op call on CUDA reaches the launchers unchecked: they repeat the C++ kernel's checks
    (targets, log_q or grad_out shorter than the logits' B or D+1 would be read out of bounds)."""
    with pytest.raises(error, match=pattern):
        call()
