"""Tests of the CPU (C++) backend of ``bnas_fast.depth_loglik`` and of its benchmark cases.

Organised like tests/test_mix.py: one generator, :func:`sample_inputs`, describes the ladder of
inputs (dtypes x shapes (D+1, B, C), each with a kind of depth posterior log_q, a choice of which
inputs need a gradient, and a memory layout of the logits); builders turn a case into tensors; the
parity tests and opcheck consume them. The oracle is :mod:`bnas_fast.reference` evaluated in
float64 on the same input values, so every dtype is judged against (nearly) exact math, with the
tolerances of :data:`TOLERANCES`.

Rungs:
 1. forward / backward parity with the reference (and the reference's explicit backward formulas
    against autograd through the reference forward); depths without mass get exactly zero gradient;
 2. float64 gradcheck;
 3. torch.library.opcheck;
 4. torch.compile(fullgraph=True) of a small ELBO-like loss against eager;
 5. determinism (repeat calls, thread counts);
 6. argument errors;
 7. benchmark cases and the peak-memory helper.
"""

from __future__ import annotations

import importlib
import itertools
import types
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import bnas_fast
from _threads import num_threads
from _tolerance import assert_within
from bnas_fast import reference

# ---------------------------------------------------------------------------------------------
# Tolerances, as data. Key: (dtype, kind).
#   "out":         out[b] = sum_i q_i * (x[i, b, y_b] - lse(x[i, b, :])), a q-weighted sum of at most
#                  D+1 = 51 log-probabilities; with logits ~ N(0, 3^2) and C <= 17, |lse| <~ 15.
#   "grad_logits": g_b * q_i * (1[c = y_b] - p_c), elementwise: a product of three O(1) factors,
#                  p = exp(x - lse) computed once.
#   "grad_log_q":  q_i * sum_b g_b * l[i, b], a reduction over B examples (<= 130 in the ladder) of
#                  terms up to ~40.
# The expected values always come from the reference evaluated in float64 on the same inputs.
# Absolute tolerances are needed everywhere: log p(y) = x_y - lse cancels when p(y) ~ 1, and
# 1[c = y] - p_c cancels likewise, so a small result carries the rounding error of O(10) operands.
# ---------------------------------------------------------------------------------------------
TOLERANCES = {
    # float64 (std::exp, no fast path): the rounding of O(10) operands; measured <= 1e-15 absolute
    # on the ladder and on (51, 512, 10).
    (torch.float64, "out"): {"rtol": 1e-12, "atol": 1e-12},
    (torch.float64, "grad_logits"): {"rtol": 1e-12, "atol": 1e-12},
    # A sum over B examples in chunks of 64 (torch sums in another order); measured 1.2e-14 at B = 512.
    (torch.float64, "grad_log_q"): {"rtol": 1e-12, "atol": 1e-12},
    # float32: the kernel's exp is a degree-6 polynomial (~1 ulp), so p_c and log p(y) carry a few
    # ulp of relative error (rtol 1.3e-6, torch's float32 default), plus eps * |log(sum e)| ~ 2e-7
    # absolute where log p(y) = (x_y - max) - log(sum e) or 1 - p_y cancels, times |g q| <~ 4 for
    # the gradient and summed over <= 51 depths for out. Measured worst: ~0.3 of these budgets.
    (torch.float32, "out"): {"rtol": 1.3e-6, "atol": 2e-6},
    (torch.float32, "grad_logits"): {"rtol": 1.3e-6, "atol": 2e-6},
    # Loosened: a float32 sum over B terms g_b * l[i, b] of size up to ~40 that partly cancel; the
    # accumulation error is <~ sqrt(B) * 6e-8 * 40 ~ 3e-5 at B = 512 (measured 1.1e-5, for the
    # reference's backward formula: torch.sum in float32 errs as much as the kernel's chunked sum).
    (torch.float32, "grad_log_q"): {"rtol": 1e-5, "atol": 1e-4},
    # bfloat16/float16: the inputs widen exactly to float32, the kernel computes in float32 and
    # rounds once; bf16 keeps 8 significant bits (relative rounding error <= 2^-8), float16 11 bits
    # (2^-11). rtol allows one more ulp, for a float32 result lying next to a rounding boundary
    # (measured: half the budget, i.e. the half-ulp rounding itself); atol is float32's, which also
    # covers float16's subnormal spacing (6e-8: gradients of tiny q underflow; measured 3e-8).
    (torch.bfloat16, "out"): {"rtol": 2**-7, "atol": 2e-6},
    (torch.bfloat16, "grad_logits"): {"rtol": 2**-7, "atol": 2e-6},
    (torch.bfloat16, "grad_log_q"): {"rtol": 2**-7, "atol": 1e-4},
    (torch.float16, "out"): {"rtol": 2**-10, "atol": 2e-6},
    (torch.float16, "grad_logits"): {"rtol": 2**-10, "atol": 2e-6},
    (torch.float16, "grad_log_q"): {"rtol": 2**-10, "atol": 1e-4},
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, kind: str, what: str = "") -> None:
    """Elementwise closeness with TOLERANCES[(dtype, kind)] (see tests/_tolerance.py)."""
    assert_within(actual, expected, TOLERANCES[(dtype, kind)], what)


# ---------------------------------------------------------------------------------------------
# The sample generator
# ---------------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (D+1, B, C). (4, 130, 5): three chunks of <= 64 examples, the last one partial. C <= 64 takes the
# kernel's transposed (narrow) layout, wider rows the row-wise one: (3, 70, 65) ends its rows with a
# tail of one class after four 16-lane blocks; (2, 37, 1000) runs 16 rows per chunk, the last partial.
SHAPES = (
    (1, 1, 1),
    (2, 7, 3),
    (21, 123, 10),
    (51, 1, 10),
    (6, 5, 17),
    (4, 130, 5),
    (3, 70, 64),
    (3, 70, 65),
    (2, 37, 1000),
)
LOG_Q_KINDS = (
    "posterior",  # log_softmax of N(0, 1) logits: every depth has mass
    "zero_mass",  # the same with one depth at -inf (q = 0); with D+1 = 1 no depth has mass
    "peaked",  # log_softmax of N(0, 8^2) logits: q spans many orders of magnitude (some < 1e-20)
)
GRADS = ("both", "logits", "log_q")  # which of logits / log_q require grad
LAYOUTS = (
    "contiguous",
    "transposed",  # a [B, D+1, C] tensor permuted to [D+1, B, C]
    "sliced",  # every other element of a [D+1, B, 2C] tensor (stride 2 along the classes)
)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int]
    dtype: torch.dtype
    log_q: str
    grads: str
    layout: str

    def __str__(self) -> str:
        return (
            f"{str(self.dtype).replace('torch.', '')}-{'x'.join(map(str, self.shape))}-"
            f"{self.log_q}-grad_{self.grads}-{self.layout}"
        )

    @property
    def logits_requires_grad(self) -> bool:
        return self.grads in ("both", "logits")

    @property
    def log_q_requires_grad(self) -> bool:
        return self.grads in ("both", "log_q")

    def generator(self, salt: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32((str(self) + salt).encode()))


def sample_inputs() -> list[Case]:
    """Every dtype x shape (36 cases). The log_q kind, which inputs need a gradient and the layout
    of the logits vary with the indices of the dtype and shape (a Latin-square-like design), so each
    dtype meets every variant and every shape meets every layout."""
    cases = []
    for (d, dtype), (s, shape) in itertools.product(enumerate(DTYPES), enumerate(SHAPES)):
        cases.append(
            Case(
                shape,
                dtype,
                LOG_Q_KINDS[(s + d) % 3],
                GRADS[(s // 2 + d) % 3],
                LAYOUTS[(s + 2 * d) % 3],
            )
        )
    return cases


CASES = sample_inputs()


def make_logits(shape, dtype: torch.dtype, gen: torch.Generator, layout: str = "contiguous") -> Tensor:
    """logits ~ N(0, 3^2) of ``shape`` [D+1, B, C] (softmaxes far from uniform and from one-hot)."""
    d1, b, c = shape
    if layout == "contiguous":
        return (3 * torch.randn(d1, b, c, generator=gen)).to(dtype)
    if layout == "transposed":
        return (3 * torch.randn(b, d1, c, generator=gen)).to(dtype).permute(1, 0, 2)
    if layout == "sliced":
        return (3 * torch.randn(d1, b, 2 * c, generator=gen)).to(dtype)[..., ::2]
    raise AssertionError(layout)


def make_log_q(depths: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    scale = 8.0 if kind == "peaked" else 1.0
    q_logits = scale * torch.randn(depths, generator=gen, dtype=torch.float64)
    if kind == "zero_mass":
        q_logits[depths // 2] = -float("inf")
        if depths == 1:  # log_softmax([-inf]) is NaN; no depth has mass: log_q = [-inf]
            return q_logits.to(dtype)
    return torch.log_softmax(q_logits, 0).to(dtype)


def make_inputs(case: Case) -> tuple[Tensor, Tensor, Tensor]:
    """logits [D+1, B, C], targets [B] and log_q [D+1] for ``case``, with requires_grad as it says."""
    gen = case.generator("inputs")
    d1, b, c = case.shape
    logits = make_logits(case.shape, case.dtype, gen, case.layout).requires_grad_(case.logits_requires_grad)
    targets = torch.randint(0, c, (b,), generator=gen)
    log_q = make_log_q(d1, case.log_q, case.dtype, gen).requires_grad_(case.log_q_requires_grad)
    return logits, targets, log_q


def _grad_out(case: Case) -> Tensor:
    return torch.randn(case.shape[1], generator=case.generator("grad")).to(case.dtype)


def _float64(t: Tensor, requires_grad: bool = True) -> Tensor:
    return t.detach().double().requires_grad_(requires_grad)


def _reference_grads(
    logits: Tensor, targets: Tensor, log_q: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Output and gradients to logits and log_q by autograd through the float64 reference."""
    x64, lq64 = _float64(logits), _float64(log_q)
    out = reference.depth_loglik(x64, targets, lq64)
    grad_x, grad_lq = torch.autograd.grad(out, [x64, lq64], g.double())
    return out.detach(), grad_x, grad_lq


def _no_mass(log_q: Tensor) -> Tensor:
    return log_q.detach() == -float("inf")


def test_sample_inputs_cover_the_ladder():
    for dtype in DTYPES:
        mine = [c for c in CASES if c.dtype == dtype]
        assert {c.shape for c in mine} == set(SHAPES)
        assert {c.log_q for c in mine} == set(LOG_Q_KINDS)
        assert {c.grads for c in mine} == set(GRADS)
        assert {c.layout for c in mine} == set(LAYOUTS)
    for shape in SHAPES:
        assert {c.layout for c in CASES if c.shape == shape} == set(LAYOUTS)
    # a depth without mass in a batch of several chunks, and in each dtype's ladder
    assert any(c.log_q == "zero_mass" and c.shape[1] > 64 for c in CASES)
    for case in CASES:
        logits, targets, log_q = make_inputs(case)
        assert (
            logits.shape == case.shape and log_q.shape == case.shape[:1] and targets.shape == case.shape[1:2]
        )
        assert logits.dtype == log_q.dtype == case.dtype
        if case.layout != "contiguous" and min(case.shape) > 1:
            assert not logits.is_contiguous(), case
        assert bool(_no_mass(log_q).any()) == (case.log_q == "zero_mass"), case
        assert bool(torch.isfinite(logits).all())


def test_cpu_backend_is_the_cpp_extension():
    if bnas_fast._backend.forced_backend() == "reference":
        pytest.skip("BNAS_FAST_BACKEND=reference forces the reference backend")
    assert bnas_fast.backends()["cpu"] == "cpp", (
        "the C++ extension is not built: the tests would test the reference"
    )


# ---------------------------------------------------------------------------------------------
# 1. Parity with the reference
# ---------------------------------------------------------------------------------------------
def _check_no_mass_depths(grad_logits: Tensor, grad_log_q: Tensor | None, log_q: Tensor, what: str) -> None:
    """A depth with q = 0 contributes nothing: its logits' gradient (and its log_q gradient) must
    be exactly zero, not merely small."""
    for i in _no_mass(log_q).nonzero().flatten().tolist():
        assert torch.count_nonzero(grad_logits[i]) == 0, (
            f"{what}: grad_logits[{i}] non-zero at a depth with q = 0"
        )
        if grad_log_q is not None:
            assert grad_log_q[i].item() == 0, f"{what}: grad_log_q[{i}] non-zero at a depth with q = 0"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_depth_loglik_forward_matches_reference(case):
    logits, targets, log_q = make_inputs(case)
    out = bnas_fast.depth_loglik(logits, targets, log_q)
    expected = reference.depth_loglik(_float64(logits, False), targets, _float64(log_q, False))
    assert out.dtype == case.dtype and out.shape == (case.shape[1],) and out.is_contiguous()
    assert out.requires_grad  # either input requires grad in every case
    assert_close(out, expected, case.dtype, "out", "out")
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_depth_loglik_backward_matches_reference_autograd(case):
    logits, targets, log_q = make_inputs(case)
    out = bnas_fast.depth_loglik(logits, targets, log_q)
    g = _grad_out(case)
    out.backward(g)
    _, exp_x, exp_lq = _reference_grads(logits, targets, log_q, g)

    if case.logits_requires_grad:
        assert logits.grad.dtype == case.dtype and logits.grad.shape == case.shape
        assert_close(logits.grad, exp_x, case.dtype, "grad_logits", "grad_logits")
        _check_no_mass_depths(logits.grad, log_q.grad, log_q, "autograd")
    else:
        assert logits.grad is None
    if case.log_q_requires_grad:
        assert log_q.grad.dtype == case.dtype and log_q.grad.shape == case.shape[:1]
        assert_close(log_q.grad, exp_lq, case.dtype, "grad_log_q", "grad_log_q")
        assert bool((log_q.grad[_no_mass(log_q)] == 0).all())
    else:
        assert log_q.grad is None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_depth_loglik_backward_matches_its_autograd(case):
    logits, targets, log_q = make_inputs(case)
    g = _grad_out(case)
    grad_x, grad_lq = reference.depth_loglik_backward(g, logits.detach(), targets, log_q.detach())
    _, exp_x, exp_lq = _reference_grads(logits, targets, log_q, g)
    assert grad_x.dtype == grad_lq.dtype == case.dtype
    assert_close(grad_x, exp_x, case.dtype, "grad_logits", "grad_logits")
    assert_close(grad_lq, exp_lq, case.dtype, "grad_log_q", "grad_log_q")
    _check_no_mass_depths(grad_x, grad_lq, log_q, "reference backward")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_op_matches_reference(case):
    """The registered backward op called directly computes both gradients, whatever requires grad."""
    logits, targets, log_q = make_inputs(case)
    g = _grad_out(case)
    grad_x, grad_lq = torch.ops.bnas_fast.depth_loglik_backward(g, logits.detach(), targets, log_q.detach())
    _, exp_x, exp_lq = _reference_grads(logits, targets, log_q, g)
    assert grad_x.shape == case.shape and grad_x.is_contiguous() and grad_lq.shape == case.shape[:1]
    assert_close(grad_x, exp_x, case.dtype, "grad_logits", "grad_logits")
    assert_close(grad_lq, exp_lq, case.dtype, "grad_log_q", "grad_log_q")
    _check_no_mass_depths(grad_x, grad_lq, log_q, "backward op")


def test_autograd_formula_returns_none_for_inputs_without_grad():
    # bnas_fast.ops.depth_loglik is also the function, hence import_module
    ops_depth = importlib.import_module("bnas_fast.ops.depth_loglik")
    logits, targets, log_q = (
        torch.randn(3, 4, 5),
        torch.tensor([0, 4, 2, 1]),
        torch.log_softmax(torch.randn(3), 0),
    )
    for needs in ((True, False, False), (False, False, True), (True, False, True)):
        ctx = types.SimpleNamespace(saved_tensors=(logits, targets, log_q), needs_input_grad=needs)
        result = ops_depth._backward_formula(ctx, torch.ones(4))
        assert len(result) == 3 and result[1] is None  # targets: never a gradient
        assert (result[0] is not None) == needs[0] and (result[2] is not None) == needs[2]
        if needs[0]:
            assert result[0].shape == (3, 4, 5)
        if needs[2]:
            assert result[2].shape == (3,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_depth_without_mass_is_the_same_as_no_depth(dtype):
    """log_q[i] = -inf removes depth i: the output equals that of the logits without row i, and
    neither row i's logits nor their values matter."""
    gen = torch.Generator().manual_seed(3)
    logits = make_logits((5, 130, 7), dtype, gen)
    targets = torch.randint(0, 7, (130,), generator=gen)
    log_q = make_log_q(5, "posterior", dtype, gen)
    log_q[2] = -float("inf")
    out = bnas_fast.depth_loglik(logits, targets, log_q)
    keep = [0, 1, 3, 4]
    assert torch.equal(out, bnas_fast.depth_loglik(logits[keep], targets, log_q[keep]))
    other = logits.clone()
    other[2] = 100 * torch.randn(130, 7, generator=gen, dtype=dtype)
    assert torch.equal(out, bnas_fast.depth_loglik(other, targets, log_q))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_depth_with_mass_gives_zeros(dtype):
    logits = torch.randn(3, 70, 4, dtype=dtype, requires_grad=True)
    log_q = torch.full((3,), -float("inf"), dtype=dtype, requires_grad=True)
    out = bnas_fast.depth_loglik(logits, torch.randint(0, 4, (70,)), log_q)
    assert out.shape == (70,) and torch.count_nonzero(out) == 0
    out.backward(torch.randn(70).to(dtype))
    assert torch.count_nonzero(logits.grad) == 0 and torch.count_nonzero(log_q.grad) == 0


def test_empty_batch_and_no_depths():
    logits = torch.randn(3, 0, 4, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(3), 0).requires_grad_()
    out = bnas_fast.depth_loglik(logits, torch.zeros(0, dtype=torch.int64), log_q)
    assert out.shape == (0,)
    out.sum().backward()
    assert logits.grad.shape == (3, 0, 4) and torch.count_nonzero(log_q.grad) == 0

    logits = torch.randn(0, 5, 4, requires_grad=True)
    out = bnas_fast.depth_loglik(logits, torch.tensor([0, 1, 2, 3, 0]), torch.zeros(0, requires_grad=True))
    assert out.shape == (5,) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert logits.grad.shape == (0, 5, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_and_shifted_logits(dtype):
    """Logits far from 0 lose no accuracy: log p(y) must be formed as (x_y - max) - log(sum e), as
    torch.log_softmax does. Rounding lse = max + log(sum e) first costs ulp(max) / 2 absolute:
    3e-5 at logits ~ 1e3 in float32 (over this test's atol), and the whole of log(sum e) when
    |max| = 1e30 dwarfs it (a row of equal logits then gets log p = 0 instead of -log C)."""
    gen = torch.Generator().manual_seed(4)
    logits = make_logits((6, 70, 9), dtype, gen)
    targets = torch.randint(0, 9, (70,), generator=gen)
    log_q = make_log_q(6, "posterior", dtype, gen)
    for shift in (1e3, -1e4):
        shifted = logits + shift  # rounds the logits themselves: the oracle sees the rounded values
        out = bnas_fast.depth_loglik(shifted, targets, log_q)
        expected = reference.depth_loglik(shifted.double(), targets, log_q.double())
        assert_close(out, expected, dtype, "out", f"logits + {shift}")
        g = torch.randn(70, generator=gen, dtype=dtype)
        grad_x, grad_lq = torch.ops.bnas_fast.depth_loglik_backward(g, shifted, targets, log_q)
        _, exp_x, exp_lq = _reference_grads(shifted, targets, log_q, g)
        assert_close(grad_x, exp_x, dtype, "grad_logits", f"grad_logits, logits + {shift}")
        assert_close(grad_lq, exp_lq, dtype, "grad_log_q", f"grad_log_q, logits + {shift}")

    big = torch.where(torch.rand(6, 70, 9, generator=gen) < 0.5, 1e30, -1e30).to(dtype)
    big[:, 0] = -1e30  # example 0: every row ties, log p(y) = -log 9 at every depth
    out = bnas_fast.depth_loglik(big, targets, log_q)
    expected = reference.depth_loglik(big.double(), targets, log_q.double())
    assert out[0].item() == pytest.approx(
        -torch.log(torch.tensor(9.0)).item() * float(log_q.double().exp().sum()), rel=1e-6
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. gradcheck
# ---------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    Case((2, 7, 3), torch.float64, "posterior", "both", "contiguous"),
    Case((6, 5, 17), torch.float64, "zero_mass", "both", "transposed"),
    Case((4, 3, 5), torch.float64, "peaked", "both", "sliced"),
    Case((1, 2, 1), torch.float64, "posterior", "both", "contiguous"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_depth_loglik_gradcheck(case):
    logits, targets, log_q = make_inputs(case)
    assert torch.autograd.gradcheck(lambda x, lq: bnas_fast.depth_loglik(x, targets, lq), (logits, log_q))


# ---------------------------------------------------------------------------------------------
# 3. opcheck
# ---------------------------------------------------------------------------------------------
def _opcheck_cases() -> list[Case]:
    """Small cases: one per dtype and gradient pattern, with every log_q kind and layout among them."""
    small = [c for c in CASES if c.shape[0] * c.shape[1] * c.shape[2] <= 600 and c.shape[1] > 1]
    picked = [
        Case((6, 5, 17), dtype, kind, grads, layout)
        for dtype, kind, grads, layout in zip(
            DTYPES, LOG_Q_KINDS + ("zero_mass",), GRADS + ("both",), LAYOUTS * 2
        )
    ]
    picked += small[:2]
    assert {c.log_q for c in picked} == set(LOG_Q_KINDS) and {c.layout for c in picked} == set(LAYOUTS)
    return picked


@pytest.mark.parametrize("case", _opcheck_cases(), ids=str)
def test_opcheck_depth_loglik(case):
    logits, targets, log_q = make_inputs(case)
    torch.library.opcheck(torch.ops.bnas_fast.depth_loglik.default, (logits, targets, log_q))
    with torch.no_grad():
        torch.library.opcheck(
            torch.ops.bnas_fast.depth_loglik.default, (logits.detach(), targets, log_q.detach())
        )


@pytest.mark.parametrize("case", _opcheck_cases()[:3], ids=str)
def test_opcheck_depth_loglik_backward(case):
    logits, targets, log_q = make_inputs(case)
    torch.library.opcheck(
        torch.ops.bnas_fast.depth_loglik_backward.default,
        (_grad_out(case), logits.detach(), targets, log_q.detach()),
    )


# ---------------------------------------------------------------------------------------------
# 4. torch.compile
# ---------------------------------------------------------------------------------------------
# aot_eager: Dynamo (fullgraph), the fake kernels and the autograd formula traced by AOTAutograd,
# in about a second. inductor also generates code around the op (the matmul, log_softmax and KL
# terms); it is marked slow: 30 s with a cold inductor cache on 2 cores (4 s warm).
COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def _elbo_loss(h: Tensor, weight: Tensor, targets: Tensor, q_logits: Tensor, log_prior: Tensor) -> Tensor:
    """A learnt-depth ELBO: -E_q[log p(y | x, d)] + KL(q || prior) / N with one output block
    (``weight``) applied to every depth's activation h[i]."""
    logits = h @ weight  # [D+1, B, H] @ [H, C]
    log_q = torch.log_softmax(q_logits, 0)
    loglik = bnas_fast.depth_loglik(logits, targets, log_q)
    kl = (log_q.exp() * (log_q - log_prior)).sum()
    return -loglik.mean() + kl / 1000


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_elbo_loss_matches_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_elbo_loss, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(6)
    depths, batch, hidden, classes = 6, 70, 8, 10
    log_prior = torch.log_softmax(torch.randn(depths, generator=gen), 0)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    for step in range(2):  # same shapes: the second call reuses the graph
        h = torch.randn(depths, batch, hidden, generator=gen, requires_grad=True)
        weight = torch.randn(hidden, classes, generator=gen, requires_grad=True)
        q_logits = (2 * torch.randn(depths, generator=gen)).requires_grad_()
        loss_c = compiled(h, weight, targets, q_logits, log_prior)
        grads_c = torch.autograd.grad(loss_c, [h, weight, q_logits])
        loss_e = _elbo_loss(h, weight, targets, q_logits, log_prior)
        grads_e = torch.autograd.grad(loss_e, [h, weight, q_logits])
        torch.testing.assert_close(loss_c, loss_e)
        for name, a, b in zip(("h", "weight", "q_logits"), grads_c, grads_e):
            assert torch.count_nonzero(b) > 0
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


# ---------------------------------------------------------------------------------------------
# 5. Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["posterior", "zero_mass"])
def test_deterministic_across_calls_and_thread_counts(dtype, kind):
    """B = 1000: 16 chunks of 64 examples, split between threads; grad_log_q sums the chunks'
    partial sums in chunk order, so the thread count must not change a bit."""
    case = Case((21, 1000, 10), dtype, kind, "both", "contiguous")
    logits, targets, log_q = make_inputs(case)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(7)).to(dtype)

    def run():
        out = bnas_fast.depth_loglik(logits, targets, log_q)
        return [out.detach()] + list(torch.autograd.grad(out, [logits, log_q], g))

    results = [run(), run()]
    with num_threads(1):
        results.append(run())
    with num_threads(2):
        results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 6. Argument errors
# ---------------------------------------------------------------------------------------------
def _x(d1=3, b=4, c=3, dtype=torch.float32):
    return torch.randn(d1, b, c, dtype=dtype)


def _t(b=4, c=3):
    return torch.arange(b) % c


def _lq(d1=3, dtype=torch.float32):
    return torch.log_softmax(torch.randn(d1, dtype=torch.float64), 0).to(dtype)


def _with(t: Tensor, index: tuple, value: float) -> Tensor:
    t = t.clone()
    t[index] = value
    return t


_f = bnas_fast.depth_loglik
_op = torch.ops.bnas_fast.depth_loglik
_op_bwd = torch.ops.bnas_fast.depth_loglik_backward
_NAN, _INF = float("nan"), float("inf")

BAD_CALLS = {
    # logits
    "logits_2d": (
        lambda: _f(torch.randn(4, 3), _t(), _lq()),
        ValueError,
        r"logits must have shape \[D\+1, B, C\]",
    ),
    "logits_4d": (lambda: _f(torch.randn(3, 4, 3, 1), _t(), _lq()), ValueError, r"logits must have shape"),
    "op_logits_2d": (
        lambda: _op(torch.randn(4, 3), _t(), _lq()),
        ValueError,
        r"logits must be \[D\+1, B, C\]",
    ),
    "logits_no_classes": (
        lambda: _f(_x(c=0), _t(), _lq()),
        ValueError,
        r"logits must have at least one class",
    ),
    "logits_int": (
        lambda: _f(torch.ones(3, 4, 3, dtype=torch.int64), _t(), _lq()),
        TypeError,
        r"logits must be a floating-point",
    ),
    "logits_not_a_tensor": (
        lambda: _f([[[0.0]]], _t(1, 1), _lq(1)),
        TypeError,
        r"logits must be a torch\.Tensor",
    ),
    "nan_logits": (lambda: _f(_with(_x(), (1, 2, 0), _NAN), _t(), _lq()), ValueError, r"logits contains NaN"),
    "inf_logits": (
        lambda: _f(_with(_x(), (0, 3, 2), _INF), _t(), _lq()),
        ValueError,
        r"logits contains NaN or inf",
    ),
    "neg_inf_logits": (
        lambda: _f(_with(_x(), (2, 0, 1), -_INF), _t(), _lq()),
        ValueError,
        r"logits contains",
    ),
    "nan_logits_float64": (
        lambda: _f(_with(_x(dtype=torch.float64), (0, 0, 0), _NAN), _t(), _lq(dtype=torch.float64)),
        ValueError,
        r"logits contains NaN",
    ),
    "nan_logits_bf16": (
        lambda: _f(_with(_x(dtype=torch.bfloat16), (2, 3, 2), _NAN), _t(), _lq(dtype=torch.bfloat16)),
        ValueError,
        r"logits contains NaN",
    ),
    "inf_logits_fp16": (
        lambda: _f(_with(_x(dtype=torch.float16), (1, 1, 1), _INF), _t(), _lq(dtype=torch.float16)),
        ValueError,
        r"logits contains NaN or inf",
    ),
    "nan_logits_last_chunk": (  # example 129: the third chunk, run by whichever thread
        lambda: _f(_with(_x(b=130), (1, 129, 2), _NAN), _t(130), _lq()),
        ValueError,
        r"logits contains NaN",
    ),
    "nan_logits_wide_tail": (  # C = 70: a wide row (not transposed); class 66 is in the 16-lane tail
        lambda: _f(_with(_x(c=70), (2, 3, 66), _NAN), _t(), _lq()),
        ValueError,
        r"logits contains NaN",
    ),
    "inf_logits_wide_block": (
        lambda: _f(_with(_x(c=70), (0, 1, 17), _INF), _t(), _lq()),
        ValueError,
        r"logits contains NaN or inf",
    ),
    "op_nan_logits": (
        lambda: _op(_with(_x(), (1, 2, 0), _NAN), _t(), _lq()),
        ValueError,
        r"logits contains NaN",
    ),
    "op_inf_logits": (lambda: _op(_with(_x(), (1, 2, 0), _INF), _t(), _lq()), ValueError, r"logits contains"),
    # targets
    "targets_int32": (
        lambda: _f(_x(), _t().int(), _lq()),
        TypeError,
        r"targets must be a 1-D int64 tensor, got torch\.int32",
    ),
    "targets_float": (lambda: _f(_x(), _t().float(), _lq()), TypeError, r"targets must be a 1-D int64"),
    "targets_2d": (lambda: _f(_x(), _t().view(4, 1), _lq()), TypeError, r"targets must be a 1-D int64"),
    "targets_not_a_tensor": (
        lambda: _f(_x(), [0, 1, 2, 0], _lq()),
        TypeError,
        r"targets must be a torch\.Tensor",
    ),
    "op_targets_int32": (lambda: _op(_x(), _t().int(), _lq()), ValueError, r"targets must be a 1-D int64"),
    "targets_too_short": (
        lambda: _f(_x(), _t(3), _lq()),
        ValueError,
        r"targets has 3 entries but logits has B = 4",
    ),
    "targets_too_long": (
        lambda: _f(_x(), _t(5), _lq()),
        ValueError,
        r"targets has 5 entries but logits has B = 4",
    ),
    "op_targets_length": (lambda: _op(_x(), _t(5), _lq()), ValueError, r"targets has 5 entries"),
    "targets_too_big": (
        lambda: _f(_x(), torch.tensor([0, 1, 3, 2]), _lq()),
        IndexError,
        r"targets\b.*\b3\b.*out of range for C",
    ),
    "targets_negative": (
        lambda: _f(_x(), torch.tensor([0, -1, 2, 2]), _lq()),
        IndexError,
        r"targets\b.*-1\b.*out of range for C",
    ),
    "op_targets_too_big": (
        lambda: _op(_x(), torch.tensor([0, 1, 2, 7]), _lq()),
        IndexError,
        r"targets\b.*\b7\b.*out of range",
    ),
    "op_targets_negative": (
        lambda: _op(_x(), torch.tensor([-3, 1, 2, 0]), _lq()),
        IndexError,
        r"targets\b.*-3\b.*out of range",
    ),
    "op_backward_targets_too_big": (
        lambda: _op_bwd(torch.ones(4), _x(), torch.tensor([0, 1, 2, 3]), _lq()),
        IndexError,
        r"depth_loglik_backward: targets\[3\] = 3 is out of range",
    ),
    # log_q ("logits of the wrong length" in the issue: the depth posterior's)
    "log_q_too_long": (
        lambda: _f(_x(), _t(), _lq(4)),
        ValueError,
        r"log_q must have shape \[D\+1\] = \[3\] to match logits, got \(4,\)",
    ),
    "log_q_too_short": (
        lambda: _f(_x(), _t(), _lq(2)),
        ValueError,
        r"log_q must have shape \[D\+1\] = \[3\]",
    ),
    "log_q_2d": (lambda: _f(_x(), _t(), _lq().view(3, 1)), ValueError, r"log_q must have shape"),
    "op_log_q_length": (lambda: _op(_x(), _t(), _lq(4)), ValueError, r"log_q must be \[D\+1\] = \[3\]"),
    "log_q_float64": (
        lambda: _f(_x(), _t(), _lq(dtype=torch.float64)),
        TypeError,
        r"log_q has dtype torch\.float64 but logits has dtype torch\.float32",
    ),
    "log_q_int": (lambda: _f(_x(), _t(), torch.zeros(3, dtype=torch.int64)), TypeError, r"log_q has dtype"),
    "log_q_not_a_tensor": (
        lambda: _f(_x(), _t(), [0.0, 0.0, 0.0]),
        TypeError,
        r"log_q must be a torch\.Tensor",
    ),
    "op_log_q_dtype": (
        lambda: _op(_x(), _t(), _lq(dtype=torch.float64)),
        ValueError,
        r"log_q has dtype Double",
    ),
    "nan_log_q": (lambda: _f(_x(), _t(), _with(_lq(), (1,), _NAN)), ValueError, r"(?i)log_q\b.*\bnan\b"),
    "pos_inf_log_q": (lambda: _f(_x(), _t(), _with(_lq(), (2,), _INF)), ValueError, r"(?i)log_q\b.*\binf"),
    "nan_log_q_bf16": (
        lambda: _f(_x(dtype=torch.bfloat16), _t(), _with(_lq(dtype=torch.bfloat16), (0,), _NAN)),
        ValueError,
        r"(?i)log_q\b.*\bnan\b",
    ),
    "op_nan_log_q": (lambda: _op(_x(), _t(), _with(_lq(), (1,), _NAN)), ValueError, r"(?i)log_q\b.*\bnan\b"),
    "op_backward_pos_inf_log_q": (
        lambda: _op_bwd(torch.ones(4), _x(), _t(), _with(_lq(), (0,), _INF)),
        ValueError,
        r"log_q\[0\] = inf",
    ),
    # grad_out of a direct backward call
    "op_backward_grad_out_length": (
        lambda: _op_bwd(torch.ones(5), _x(), _t(), _lq()),
        ValueError,
        r"grad_out must be \[B\] = \[4\]",
    ),
    "op_backward_grad_out_dtype": (
        lambda: _op_bwd(torch.ones(4, dtype=torch.float64), _x(), _t(), _lq()),
        ValueError,
        r"grad_out has dtype Double but logits has Float",
    ),
    # devices ('meta' stands in for a second device)
    "targets_on_meta": (
        lambda: _f(_x(), _t().to("meta"), _lq()),
        ValueError,
        r"targets is on meta but logits is on cpu",
    ),
    "log_q_on_meta": (
        lambda: _f(_x(), _t(), _lq().to("meta")),
        ValueError,
        r"log_q is on meta but logits is on cpu",
    ),
    "logits_on_meta": (
        lambda: _f(_x().to("meta"), _t(), _lq()),
        ValueError,
        r"targets is on cpu but logits is on meta",
    ),
}

# Metadata checks of direct op calls, and every check of the backward op, live in the C++ kernels
# only: the reference kernels that serve CPU under BNAS_FAST_BACKEND=reference check values (NaN,
# targets' range) in the forward but trust the metadata, which the public function checks.
_CPP_ONLY = {
    "op_logits_2d",
    "op_targets_int32",
    "op_targets_length",
    "op_log_q_length",
    "op_log_q_dtype",
    "op_backward_targets_too_big",
    "op_backward_pos_inf_log_q",
    "op_backward_grad_out_length",
    "op_backward_grad_out_dtype",
}
_needs_cpp = pytest.mark.skipif(
    bnas_fast.backends()["cpu"] != "cpp", reason="checked by the C++ kernels only"
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_needs_cpp) if n in _CPP_ONLY else n for n in BAD_CALLS]
)
def test_bad_arguments_raise_naming_the_argument(name):
    call, exc_type, pattern = BAD_CALLS[name]
    with pytest.raises(exc_type, match=pattern) as info:
        call()
    assert type(info.value) is exc_type  # exactly, not a subclass (e.g. not a RuntimeError subclass)
    assert "depth_loglik" in str(info.value)  # the op is named too


def test_neg_inf_log_q_is_a_valid_input():
    """-inf is the log of q = 0, not an error: a one-hot posterior selects its depth's log-likelihood."""
    logits, targets = _x(), _t()
    out = bnas_fast.depth_loglik(logits, targets, torch.tensor([-_INF, 0.0, -_INF]))
    expected = torch.log_softmax(logits[1], -1).gather(1, targets.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bad", [_NAN, _INF, -_INF])
def test_non_finite_logits_at_a_depth_without_mass_agree_across_backends(bad):
    """The kernels never read the logits of a depth with q = 0, so a NaN there is not seen; the
    reference kernels (BNAS_FAST_BACKEND=reference) must give the same answer, not raise, and the
    same error when the depth has mass."""
    ops_depth = importlib.import_module("bnas_fast.ops.depth_loglik")
    logits, targets, grad = _with(_x(), (1, 2, 0), bad), _t(), torch.randn(4)
    log_q = torch.tensor([0.0, -_INF, -_INF])
    out = ops_depth._reference_kernel(logits, targets, log_q)
    grads = ops_depth._reference_backward_kernel(grad, logits, targets, log_q)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[0][1:]) == 0 and torch.count_nonzero(grads[1][1:]) == 0
    torch.testing.assert_close(out, _op(logits, targets, log_q))
    torch.testing.assert_close(grads, _op_bwd(grad, logits, targets, log_q))
    with_mass = torch.log_softmax(torch.zeros(3), 0)
    for call in (ops_depth._reference_kernel, _op):
        with pytest.raises(ValueError, match=r"depth_loglik: logits contains NaN or infinity"):
            call(logits, targets, with_mass)


# ---------------------------------------------------------------------------------------------
# 7. Benchmark cases and peak memory
# ---------------------------------------------------------------------------------------------
def test_peak_memory_bytes_counts_what_is_held_at_once():
    from bnas_fast.bench import peak_memory_bytes

    n = 1 << 20  # 4 MiB of float32

    def sequential():
        a = torch.ones(n)
        del a
        return torch.ones(n)

    def together():
        a, b = torch.ones(n), torch.ones(n)
        return a + b

    assert peak_memory_bytes(sequential) == 4 * n
    assert peak_memory_bytes(together) == 3 * 4 * n
    assert peak_memory_bytes(lambda: None) == 0
    # the warm-up call is not recorded
    calls = []

    def first_call_allocates():
        calls.append(torch.ones(4 * n) if not calls else None)

    assert peak_memory_bytes(first_call_allocates, warmup=1) == 0 and len(calls) == 2


def test_depth_loglik_bench_cases_are_registered_and_agree():
    from bnas_fast.bench import all_cases
    from bnas_fast.bench import depth_loglik as bench_depth_loglik

    cases = bench_depth_loglik.cases()
    names = {c.name for c in all_cases()}
    assert all(c.name in names for c in cases)
    assert [(c.shape, c.mode) for c in cases] == [
        ("D+1=51 B=512 C=10", "fwd"),
        ("D+1=51 B=512 C=10", "fwd+bwd"),
        ("D+1=21 B=256 C=10", "fwd"),
        ("D+1=21 B=256 C=10", "fwd+bwd"),
    ]
    logits_bytes = 51 * 512 * 10 * 4
    assert cases[0].bytes_moved == logits_bytes + 512 * 4
    assert cases[1].bytes_moved == 3 * logits_bytes + 512 * 4
    for case in cases[2:]:  # the small shape; the compile provider is left to the benchmarks
        providers = case.build()
        assert set(providers) == {"eager", "compile", "bnas_fast"}
        eager, fused = providers["eager"](), providers["bnas_fast"]()
        if case.mode == "fwd":
            torch.testing.assert_close(fused, eager)
        else:
            assert len(fused) == len(eager) == 2
            for a, b in zip(fused, eager):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-4)


@_needs_cpp  # the reference backend is eager
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_depth_loglik_peak_memory_below_eager(mode):
    """The issue's memory target: the fused op never materialises the [D+1, B, C] softmax."""
    from bnas_fast.bench import depth_loglik as bench_depth_loglik
    from bnas_fast.bench import peak_memory_bytes

    case = next(c for c in bench_depth_loglik.cases() if c.shape == "D+1=21 B=256 C=10" and c.mode == mode)
    providers = case.build()
    fused, eager = peak_memory_bytes(providers["bnas_fast"]), peak_memory_bytes(providers["eager"])
    logits_bytes = 21 * 256 * 10 * 4
    if mode == "fwd":
        assert fused == 256 * 4  # the output, nothing else
        assert eager >= logits_bytes  # at least the log_softmax
    else:
        assert fused <= logits_bytes + 256 * 4 + 21 * 4  # grad_logits, the output and grad_log_q
        assert fused < eager
