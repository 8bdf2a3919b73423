"""Tests of the CPU (C++) backend of ``bnas_fast.mix`` / ``bnas_fast.mix_sparse``, the samplers and MixedOp.

Organised like pytorch/extension-cpp: one generator, :func:`sample_inputs`, describes the ladder of
inputs (dtypes x batch sizes x row shapes x candidate counts, each with a weights kind, weights
with or without ``requires_grad``, and contiguous or strided tensors); builders turn a case into
dense or sparse tensors; the parity tests and opcheck consume them. The oracle is
:mod:`bnas_fast.reference` evaluated in float64 on the same input values, so every dtype is judged
against (nearly) exact math, with the tolerances of :data:`TOLERANCES`.

Rungs:
 1. forward / backward parity with the reference (and the reference's explicit backward formulas
    against autograd through the reference forward);
 2. float64 gradcheck;
 3. torch.library.opcheck;
 4. torch.compile(fullgraph=True) against eager;
 5. sparse vs dense;
 6. determinism (repeat calls, thread counts);
 7. argument errors;
 8. samplers (path dropout, schedules, arch_weights);
 9. MixedOp.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import os
import types
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import bnas_fast
from _threads import num_threads
from _tolerance import assert_within
from bnas_fast import reference, sampling
from bnas_fast.nn import MixedOp

# ---------------------------------------------------------------------------------------------
# Tolerances, as data. Key: (dtype, kind).
#   "elementwise": each output element is a sum of at most K = 8 products (forward, grad_ys).
#   "reduction":   grad_weights[b, k] = <grad_out[b], ys[k][b]>, a dot product over
#                  M = prod(rest) <= 64 * 9 * 9 = 5184 elements.
# The expected values always come from the reference evaluated in float64 on the same inputs.
# ---------------------------------------------------------------------------------------------
TOLERANCES = {
    # float64: the sums of K products are done in the reference's order; only rounding differs.
    (torch.float64, "elementwise"): {"rtol": 1e-12, "atol": 1e-12},
    # Loosened: the kernel sums a dot product in 16 interleaved partial sums per 4096-element tile
    # and the tiles in order; torch.sum uses another order. Error ~ sqrt(M) * eps * |terms|.
    (torch.float64, "reduction"): {"rtol": 1e-10, "atol": 1e-10},
    # float32 vs exact: K <= 8 roundings of O(1) terms (torch's float32 defaults).
    (torch.float32, "elementwise"): {"rtol": 1.3e-6, "atol": 1e-5},
    # Loosened: float32 dot products of up to 5184 terms with |sum| ~ sqrt(M) ~ 72; the
    # accumulation error is ~ sqrt(M) * 6e-8 * sqrt(M) ~ 3e-4 in the worst realistic case.
    (torch.float32, "reduction"): {"rtol": 1e-5, "atol": 5e-4},
    # bfloat16 against a float64 reference: products of two bf16 values are exact in float32, the
    # kernel accumulates in float32 and rounds once to bf16, whose 8-bit significand gives a
    # relative error <= 2^-8. rtol = 2^-7 allows one ulp more for a float32 sum lying next to a
    # rounding boundary; atol covers the float32 accumulation when K terms cancel.
    (torch.bfloat16, "elementwise"): {"rtol": 2**-7, "atol": 1e-4},
    # Same single bf16 rounding of a float32 dot product; atol covers float32 accumulation of up to
    # 5184 terms when they cancel.
    (torch.bfloat16, "reduction"): {"rtol": 2**-7, "atol": 1e-3},
    # float16: the same single rounding of a float32 sum, with an 11-bit significand (2^-11
    # relative), so one ulp of slack gives 2^-10; products of two float16 values are exact in float32.
    (torch.float16, "elementwise"): {"rtol": 2**-10, "atol": 1e-4},
    (torch.float16, "reduction"): {"rtol": 2**-10, "atol": 1e-3},
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, kind: str, what: str = "") -> None:
    """Elementwise closeness with TOLERANCES[(dtype, kind)] (see tests/_tolerance.py)."""
    assert_within(actual, expected, TOLERANCES[(dtype, kind)], what)


# ---------------------------------------------------------------------------------------------
# The sample generator
# ---------------------------------------------------------------------------------------------
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BATCHES = (1, 7, 123)
RESTS = ((3,), (3, 1, 1), (3, 5, 7), (64, 9, 9))  # (64, 9, 9): 5184 > 4096 elements, 2 tiles per row
NUM_CANDIDATES = (1, 3, 8)
WEIGHT_KINDS = (
    "dense",  # N(0, 1): no zeros
    "mask",  # 0/1, half of the entries zero; with K >= 3 the last candidate is unused (empty column)
    "zeros",  # N(0, 1) with the zero pattern of "mask" (soft weights on a dropped-path pattern)
)


@dataclass(frozen=True)
class Case:
    batch: int
    rest: tuple[int, ...]
    num_candidates: int
    dtype: torch.dtype
    weights: str
    weights_requires_grad: bool
    contiguous: bool

    def __str__(self) -> str:
        rest = "x".join(map(str, self.rest))
        return (
            f"{str(self.dtype).replace('torch.', '')}-B{self.batch}-rest{rest}-K{self.num_candidates}-"
            f"{self.weights}-{'gw' if self.weights_requires_grad else 'nogw'}-"
            f"{'contig' if self.contiguous else 'strided'}"
        )

    @property
    def row_size(self) -> int:
        return math.prod(self.rest)

    def generator(self, salt: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32((str(self) + salt).encode()))


def sample_inputs() -> list[Case]:
    """Every dtype x batch x rest x K combination (108 cases). The weights kind, whether weights
    need a gradient and the memory layout vary with the indices of the shape (a Latin-square-like
    design), so each dtype meets every variant and every row shape meets both layouts."""
    cases = []
    for d, dtype in enumerate(DTYPES):
        for (ib, batch), (ir, rest), (ik, k) in itertools.product(
            enumerate(BATCHES), enumerate(RESTS), enumerate(NUM_CANDIDATES)
        ):
            kind = WEIGHT_KINDS[(ib + ik + d) % len(WEIGHT_KINDS)]
            weights_requires_grad = (ib + ir + d) % 2 == 0
            contiguous = (ib + ir + ik) % 2 == 0
            cases.append(Case(batch, rest, k, dtype, kind, weights_requires_grad, contiguous))
    return cases


CASES = sample_inputs()


def _strided(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, layout: str) -> Tensor:
    """A N(0, 1) tensor of ``shape``: contiguous, a slice with stride 2, or a full transpose."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "sliced":
        return torch.randn(tuple(shape) + (2,), generator=gen).to(dtype)[..., 1]
    if layout == "transposed":
        dims = tuple(range(len(shape)))[::-1]
        return torch.randn(tuple(shape[d] for d in dims), generator=gen).to(dtype).permute(dims)
    raise AssertionError(layout)


def _layout(case: Case, k: int) -> str:
    if case.contiguous:
        return "contiguous"
    return "sliced" if k % 2 == 0 else "transposed"


def make_weights(case: Case, gen: torch.Generator) -> Tensor:
    b, k = case.batch, case.num_candidates
    values = torch.randn(b, k, generator=gen)
    if case.weights == "dense":
        values = torch.where(values == 0, torch.ones_like(values), values)
    else:
        zero = torch.zeros(b * k, dtype=torch.bool)
        zero[torch.randperm(b * k, generator=gen)[: (b * k) // 2]] = True
        zero = zero.view(b, k)
        if k >= 3:
            zero[:, -1] = True  # a candidate that no example uses
        if case.weights == "mask":
            values = (~zero).float()
        else:
            values = torch.where(values == 0, torch.ones_like(values), values).masked_fill(zero, 0.0)
    weights = values.to(case.dtype)
    if not case.contiguous:  # column-major (a transpose) when both dims exceed 1, else a stride-2 slice
        weights = (
            weights.t().contiguous().t() if b > 1 and k > 1 else torch.stack([weights, weights], -1)[..., 0]
        )
    return weights.requires_grad_(case.weights_requires_grad)


def make_dense(case: Case) -> tuple[list[Tensor], Tensor]:
    """K candidates [B, *rest] and weights [B, K] for ``case``."""
    gen = case.generator("dense")
    shape = (case.batch,) + case.rest
    ys = [
        _strided(shape, case.dtype, gen, _layout(case, k)).requires_grad_()
        for k in range(case.num_candidates)
    ]
    return ys, make_weights(case, gen)


def make_sparse(case: Case) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """K candidates [n_k, *rest] computed on random (unsorted) subsets indices[k] of the batch.

    Candidate 0 covers the whole batch (in a shuffled order); with K >= 2 the last covers nothing;
    the others cover a random number of examples. The weights are independent of the subsets, so
    covered examples may have zero weights and uncovered ones non-zero weights.
    """
    gen = case.generator("sparse")
    ys, indices = [], []
    for k in range(case.num_candidates):
        if k == 0:
            n = case.batch
        elif k == case.num_candidates - 1:
            n = 0
        else:
            n = int(torch.randint(0, case.batch + 1, (1,), generator=gen))
        idx = torch.randperm(case.batch, generator=gen)[:n]
        if not case.contiguous:
            idx = idx.repeat_interleave(2)[::2]
        indices.append(idx)
        ys.append(_strided((n,) + case.rest, case.dtype, gen, _layout(case, k)).requires_grad_())
    return ys, indices, make_weights(case, gen)


def _grad_out(case: Case, shape) -> Tensor:
    return torch.randn(tuple(shape), generator=case.generator("grad")).to(case.dtype)


def _float64_leaves(tensors: list[Tensor], requires_grad: bool = True) -> list[Tensor]:
    return [t.detach().double().requires_grad_(requires_grad) for t in tensors]


def test_sample_inputs_cover_the_ladder():
    for dtype in DTYPES:
        mine = [c for c in CASES if c.dtype == dtype]
        assert {(c.batch, c.rest, c.num_candidates) for c in mine} == set(
            itertools.product(BATCHES, RESTS, NUM_CANDIDATES)
        )
        assert {(c.weights, c.weights_requires_grad, c.contiguous) for c in mine} == set(
            itertools.product(WEIGHT_KINDS, (True, False), (True, False))
        )
        big = [c for c in mine if c.rest == (64, 9, 9) and c.batch > 1]
        assert {c.contiguous for c in big} == {True, False}
    strided = [c for c in CASES if not c.contiguous]
    for case in strided:
        ys, w = make_dense(case)
        assert not ys[0].is_contiguous(), case
        if case.batch > 1 and case.num_candidates > 1:
            assert not w.is_contiguous(), case


def test_cpu_backend_is_the_cpp_extension():
    if os.environ.get("BNAS_FAST_BACKEND", "").strip().lower() == "reference":
        pytest.skip("BNAS_FAST_BACKEND=reference forces the reference backend")
    assert bnas_fast.backends()["cpu"] == "cpp", (
        "the C++ extension is not built: the tests would test the reference"
    )


# ---------------------------------------------------------------------------------------------
# 1. Parity with the reference
# ---------------------------------------------------------------------------------------------
def _check_zero_weight_rows(grad_ys: list[Tensor], weights: Tensor, indices=None) -> None:
    """grad_ys[k] must be exactly zero on every row whose weight is zero."""
    for k, g in enumerate(grad_ys):
        col = weights[:, k].detach()
        zero = col == 0 if indices is None else col[indices[k]] == 0
        assert torch.count_nonzero(g[zero]) == 0, f"grad_ys[{k}] is non-zero on a row whose weight is zero"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_forward_matches_reference(case):
    ys, w = make_dense(case)
    out = bnas_fast.mix(ys, w)
    expected = reference.mix(_float64_leaves(ys, False), w.detach().double())
    assert out.dtype == case.dtype and out.is_contiguous()
    assert_close(out, expected, case.dtype, "elementwise", "out")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_backward_matches_reference_autograd(case):
    ys, w = make_dense(case)
    out = bnas_fast.mix(ys, w)
    g = _grad_out(case, out.shape)
    inputs = ys + ([w] if case.weights_requires_grad else [])
    grads = torch.autograd.grad(out, inputs, g)

    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.mix(ys64, w64), ys64 + [w64], g.double())
    for k in range(case.num_candidates):
        assert grads[k].dtype == case.dtype
        assert_close(grads[k], expected[k], case.dtype, "elementwise", f"grad_ys[{k}]")
    if case.weights_requires_grad:
        assert_close(grads[-1], expected[-1], case.dtype, "reduction", "grad_weights")
    _check_zero_weight_rows(list(grads[: case.num_candidates]), w)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_mix_backward_matches_its_autograd(case):
    ys, w = make_dense(case)
    g = _grad_out(case, (case.batch,) + case.rest)
    grad_ys, grad_w = reference.mix_backward(
        g, [y.detach() for y in ys], w.detach(), case.weights_requires_grad
    )

    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.mix(ys64, w64), ys64 + [w64], g.double())
    for k in range(case.num_candidates):
        assert_close(grad_ys[k], expected[k], case.dtype, "elementwise", f"grad_ys[{k}]")
    if case.weights_requires_grad:
        assert_close(grad_w, expected[-1], case.dtype, "reduction", "grad_weights")
    else:
        assert torch.count_nonzero(grad_w) == 0 and grad_w.shape == w.shape
    _check_zero_weight_rows(grad_ys, w)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_sparse_forward_matches_reference(case):
    ys, indices, w = make_sparse(case)
    out = bnas_fast.mix_sparse(ys, indices, w)
    expected = reference.mix_sparse(_float64_leaves(ys, False), indices, w.detach().double())
    assert out.dtype == case.dtype and out.is_contiguous()
    assert_close(out, expected, case.dtype, "elementwise", "out")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_sparse_backward_matches_reference_autograd(case):
    ys, indices, w = make_sparse(case)
    out = bnas_fast.mix_sparse(ys, indices, w)
    g = _grad_out(case, out.shape)
    inputs = ys + ([w] if case.weights_requires_grad else [])
    grads = torch.autograd.grad(out, inputs, g)

    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(
        reference.mix_sparse(ys64, indices, w64), ys64 + [w64], g.double(), allow_unused=True
    )
    for k in range(case.num_candidates):
        assert grads[k].shape == ys[k].shape and grads[k].dtype == case.dtype
        assert_close(grads[k], expected[k], case.dtype, "elementwise", f"grad_ys[{k}]")
    if case.weights_requires_grad:
        assert_close(grads[-1], expected[-1], case.dtype, "reduction", "grad_weights")
    _check_zero_weight_rows(list(grads[: case.num_candidates]), w, indices)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_mix_sparse_backward_matches_its_autograd(case):
    ys, indices, w = make_sparse(case)
    g = _grad_out(case, (case.batch,) + case.rest)
    grad_ys, grad_w = reference.mix_sparse_backward(
        g, [y.detach() for y in ys], indices, w.detach(), case.weights_requires_grad
    )

    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.mix_sparse(ys64, indices, w64), ys64 + [w64], g.double())
    for k in range(case.num_candidates):
        assert_close(grad_ys[k], expected[k], case.dtype, "elementwise", f"grad_ys[{k}]")
    if case.weights_requires_grad:
        assert_close(grad_w, expected[-1], case.dtype, "reduction", "grad_weights")
    else:
        assert torch.count_nonzero(grad_w) == 0 and grad_w.shape == w.shape
    _check_zero_weight_rows(grad_ys, w, indices)


@pytest.mark.parametrize("sparse", [False, True], ids=["mix", "mix_sparse"])
def test_grad_weights_is_none_and_not_computed_when_not_required(sparse, monkeypatch):
    """The autograd formula returns None for weights that need no gradient, and asks the backward
    kernel not to compute it (weights_requires_grad=False: no dot products, no reads of ys)."""
    ops_mix = importlib.import_module("bnas_fast.ops.mix")  # bnas_fast.ops.mix is also a function

    name = "mix_sparse_backward" if sparse else "mix_backward"
    flags = []
    original = getattr(torch.ops.bnas_fast, name)

    def spy(*args):
        flags.append(args[4] if sparse else args[3])  # weights_requires_grad
        return original(*args)

    monkeypatch.setattr(torch.ops.bnas_fast, name, spy)
    ys = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    indices = [torch.tensor([3, 0, 1, 2]), torch.tensor([1, 2, 3, 0])]
    for requires_grad in (False, True):
        w = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0], [3.0, 1.0]], requires_grad=requires_grad)
        out = bnas_fast.mix_sparse(ys, indices, w) if sparse else bnas_fast.mix(ys, w)
        out.sum().backward()
        assert (w.grad is not None) == requires_grad
    assert flags == [False, True]

    # The formula itself: None in the weights slot when needs_input_grad says so.
    saved = (*[y.detach() for y in ys], *(indices if sparse else []), w.detach())
    needs = (True, False, False) if sparse else (True, False)
    ctx = types.SimpleNamespace(saved_tensors=saved, needs_input_grad=needs, num_candidates=2, relu=False)
    formula = ops_mix._mix_sparse_backward_formula if sparse else ops_mix._mix_backward_formula
    result = formula(ctx, torch.ones(4, 3))
    assert result[-1] is None
    assert len(result[0]) == 2 and all(isinstance(t, Tensor) for t in result[0])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_backward_ops_match_reference_explicit_backward(requires_grad):
    """Direct calls of the registered backward ops (C++ kernels) against the reference formulas,
    including weights_requires_grad=False, for which grad_weights must be zeros."""
    case = Case(7, (3, 5, 7), 3, torch.float64, "zeros", requires_grad, False)
    ys, w = make_dense(case)
    ys, w = [y.detach() for y in ys], w.detach()
    g = _grad_out(case, (7, 3, 5, 7))
    got = torch.ops.bnas_fast.mix_backward(g, ys, w, requires_grad)
    want = reference.mix_backward(g, ys, w, requires_grad)
    for a, b in zip(got[0], want[0]):
        assert_close(a, b, torch.float64, "elementwise", "grad_ys")
    assert_close(got[1], want[1], torch.float64, "reduction", "grad_weights")
    assert bool(got[1].any()) == requires_grad

    ys_s, indices, w_s = make_sparse(case)
    ys_s, w_s = [y.detach() for y in ys_s], w_s.detach()
    got = torch.ops.bnas_fast.mix_sparse_backward(g, ys_s, indices, w_s, requires_grad)
    want = reference.mix_sparse_backward(g, ys_s, indices, w_s, requires_grad)
    for a, b in zip(got[0], want[0]):
        assert_close(a, b, torch.float64, "elementwise", "grad_ys")
    assert_close(got[1], want[1], torch.float64, "reduction", "grad_weights")
    assert bool(got[1].any()) == requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mix_large_output_matches_reference(dtype):
    """Outputs and gradients above 32 MiB (where the kernels may switch to streaming stores), with
    an odd row length so that rows start at every alignment."""
    gen = torch.Generator().manual_seed(9)
    batch, row = 4, (2_100_001 if dtype == torch.float32 else 1_050_001)
    ys = [torch.randn(batch, row, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2)]
    w = torch.tensor([[1.0, -0.5], [0.0, 2.0], [0.25, 0.0], [0.0, 0.0]], dtype=dtype, requires_grad=True)
    assert batch * row * ys[0].element_size() > 32 << 20
    out = bnas_fast.mix(ys, w)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, ys + [w], g)
    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    ref = reference.mix(ys64, w64)
    expected = torch.autograd.grad(ref, ys64 + [w64], g.double())
    assert_close(out, ref, dtype, "elementwise", "out")
    for k in range(2):
        assert_close(grads[k], expected[k], dtype, "elementwise", f"grad_ys[{k}]")
    # A dot product of ~2M (float32) / 1M (float64) terms with |result| up to ~3e3: the rounding
    # error grows like sqrt(M) * eps * rms(partial sums); measured 2.3e-3 (float32) and 1.6e-12
    # (float64); the bounds leave a 10x margin.
    tol = {"rtol": 1e-5, "atol": 2e-2} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-9}
    torch.testing.assert_close(grads[2].double(), expected[2], **tol)
    _check_zero_weight_rows(list(grads[:2]), w)

    sparse_ys, indices = reference.dense_to_sparse([y.detach() for y in ys], w.detach())
    assert_close(bnas_fast.mix_sparse(sparse_ys, indices, w.detach()), out, dtype, "elementwise", "sparse")


def test_empty_candidate_and_empty_batch():
    """A candidate that no example uses (n_k = 0) and a batch of zero examples, in the kernels and
    in the reference's explicit backward formulas."""
    ys = [torch.randn(3, 2, 5), torch.randn(0, 2, 5)]
    indices = [torch.tensor([2, 0, 1]), torch.tensor([], dtype=torch.int64)]
    w = torch.tensor([[1.0, 3.0], [0.5, 0.0], [2.0, 1.0]])
    g = torch.randn(3, 2, 5)
    for requires_grad in (True, False):
        got = torch.ops.bnas_fast.mix_sparse_backward(g, ys, indices, w, requires_grad)
        want = reference.mix_sparse_backward(g, ys, indices, w, requires_grad)
        assert got[0][1].shape == want[0][1].shape == (0, 2, 5)
        torch.testing.assert_close(got[0][0], want[0][0])
        torch.testing.assert_close(got[1], want[1])
        assert torch.count_nonzero(got[1][:, 1]) == 0

    ys0 = [torch.randn(0, 3, requires_grad=True) for _ in range(2)]
    w0 = torch.ones(0, 2, requires_grad=True)
    out = bnas_fast.mix(ys0, w0)
    assert out.shape == (0, 3)
    grads = torch.autograd.grad(out, ys0 + [w0], torch.ones(0, 3))
    assert [t.shape for t in grads] == [(0, 3), (0, 3), (0, 2)]
    ref = reference.mix_backward(torch.ones(0, 3), [y.detach() for y in ys0], w0.detach(), True)
    assert [t.shape for t in ref[0]] == [(0, 3), (0, 3)] and ref[1].shape == (0, 2)


def test_bfloat16_kernel_rounds_once_like_the_reference():
    """The bf16 kernel accumulates in float32 and rounds once: bitwise what the reference does."""
    case = Case(7, (3, 5, 7), 8, torch.bfloat16, "zeros", True, True)
    ys, w = make_dense(case)
    out = bnas_fast.mix(ys, w)
    assert torch.equal(out, reference.mix([y.detach() for y in ys], w.detach()))
    # ...which is closer to the exact result than summing in bf16 would be.
    naive = sum(w[:, k, None, None, None].detach() * ys[k].detach() for k in range(8))
    exact = reference.mix(_float64_leaves(ys, False), w.detach().double())
    assert (out.double() - exact).abs().sum() < (naive.double() - exact).abs().sum()


# ---------------------------------------------------------------------------------------------
# 2. gradcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "zeros"])
def test_mix_gradcheck(kind):
    case = Case(5, (2, 3), 3, torch.float64, kind, True, False)
    ys, w = make_dense(case)
    assert torch.autograd.gradcheck(lambda w, *ys: bnas_fast.mix(list(ys), w), (w, *ys))


@pytest.mark.parametrize("kind", ["dense", "zeros"])
def test_mix_sparse_gradcheck(kind):
    case = Case(5, (2, 3), 4, torch.float64, kind, True, False)
    ys, indices, w = make_sparse(case)
    assert torch.autograd.gradcheck(lambda w, *ys: bnas_fast.mix_sparse(list(ys), indices, w), (w, *ys))


# ---------------------------------------------------------------------------------------------
# 3. opcheck
# ---------------------------------------------------------------------------------------------
def _opcheck_cases() -> list[Case]:
    """Small cases: two per dtype, one with weights requiring grad, one without, plus strided ones."""
    small = [c for c in CASES if c.batch * c.row_size * c.num_candidates <= 400 and c.num_candidates > 1]
    small.sort(key=lambda c: c.batch != 7)  # prefer a batch of several examples
    picked = []
    for dtype, rg in itertools.product(DTYPES, (True, False)):
        picked.append(next(c for c in small if c.dtype == dtype and c.weights_requires_grad == rg))
    if all(c.contiguous for c in picked):
        picked.append(next(c for c in small if not c.contiguous))
    assert len(set(picked)) == len(picked) and {c.weights for c in picked} == set(WEIGHT_KINDS)
    return picked


@pytest.mark.parametrize("case", _opcheck_cases(), ids=str)
def test_opcheck_mix(case):
    ys, w = make_dense(case)
    torch.library.opcheck(torch.ops.bnas_fast.mix.default, (ys, w))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.bnas_fast.mix.default, ([y.detach() for y in ys], w.detach()))


@pytest.mark.parametrize("case", _opcheck_cases(), ids=str)
def test_opcheck_mix_sparse(case):
    ys, indices, w = make_sparse(case)
    torch.library.opcheck(torch.ops.bnas_fast.mix_sparse.default, (ys, indices, w))
    torch.library.opcheck(
        torch.ops.bnas_fast.mix_sparse.default, ([y.detach() for y in ys], indices, w.detach())
    )


def test_opcheck_backward_ops():
    case = Case(3, (2, 3), 3, torch.float32, "zeros", True, True)
    ys, w = make_dense(case)
    ys, w = [y.detach() for y in ys], w.detach()
    g = _grad_out(case, (3, 2, 3))
    for flag in (True, False):
        torch.library.opcheck(torch.ops.bnas_fast.mix_backward.default, (g, ys, w, flag))
    ys_s, indices, w_s = make_sparse(case)
    ys_s, w_s = [y.detach() for y in ys_s], w_s.detach()
    for flag in (True, False):
        torch.library.opcheck(torch.ops.bnas_fast.mix_sparse_backward.default, (g, ys_s, indices, w_s, flag))


# ---------------------------------------------------------------------------------------------
# 4. torch.compile
# ---------------------------------------------------------------------------------------------
def _grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Gradients, zeros for tensors the graph did not use (sparse MixedOp skips unused candidates)."""
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


# aot_eager: Dynamo (fullgraph), fake kernels and the autograd formula traced by AOTAutograd, in a
# few seconds. inductor (the default backend) also lowers the ops into generated code; it is marked
# slow because the first inductor compilation of a process with a cold cache takes ~30 s on 2 cores
# (about 5 s with a warm ~/.cache or /tmp/torchinductor_* cache).
COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_mixed_op_model_matches_eager(backend):
    """Compiled MixedOp takes the dense path (no data-dependent shapes); eager takes the sparse one.
    Outputs and gradients agree except for the gradient of zero weights (zero in sparse mode)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MixedOp(
        [nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Conv2d(3, 4, 1)]
    )
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=gen, requires_grad=True)
    params = list(model.parameters())
    masks = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float32
    )
    soft = torch.softmax(torch.randn(6, 3, generator=gen), 1)
    for weights in (masks, soft):  # same shapes: the second call reuses the graph
        weights = weights.clone().requires_grad_()
        out_c = compiled(x, weights)
        grads_c = _grads(out_c.square().sum(), [x, weights] + params)
        out_e = model(x, weights)
        grads_e = _grads(out_e.square().sum(), [x, weights] + params)
        torch.testing.assert_close(out_c, out_e)
        assert out_e.abs().sum() > 0
        nz = weights.detach() != 0
        for i, (a, b) in enumerate(zip(grads_c, grads_e)):
            if i == 1:
                torch.testing.assert_close(a[nz], b[nz])
                assert torch.count_nonzero(b[~nz]) == 0
                assert bool(nz.all()) or torch.count_nonzero(a[~nz]) > 0  # dense: <grad, y_k> there
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_function_calling_mix_matches_eager(backend):
    torch._dynamo.reset()

    def f(a, b, c, w, idx0, idx1):
        dense = bnas_fast.mix([a, b.relu(), c * 2], w)
        sparse = bnas_fast.mix_sparse([a[idx0], b[idx1]], [idx0, idx1], w[:, :2])
        return (dense.tanh() + sparse).sum(1)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(5, 7, generator=gen, requires_grad=True) for _ in range(3))
    w = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    w.requires_grad_()
    idx0, idx1 = torch.tensor([4, 0, 2]), torch.tensor([3, 1, 2, 4])
    out_c = compiled(a, b, c, w, idx0, idx1)
    out_e = f(a, b, c, w, idx0, idx1)
    torch.testing.assert_close(out_c, out_e)
    gy = torch.randn(out_e.shape, generator=gen)
    for ga, gb in zip(
        torch.autograd.grad(out_c, [a, b, c, w], gy), torch.autograd.grad(out_e, [a, b, c, w], gy)
    ):
        torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------------------------------------
# 5. Sparse vs dense
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        Case(7, (3, 5, 7), 3, torch.float32, "mask", True, True),
        Case(123, (3,), 8, torch.float64, "zeros", True, False),
        Case(7, (64, 9, 9), 3, torch.bfloat16, "zeros", True, True),
        Case(1, (3, 1, 1), 3, torch.float32, "mask", True, False),
    ],
    ids=str,
)
def test_mix_sparse_of_dense_to_sparse_equals_mix(case):
    ys, w = make_dense(case)
    ys_s, indices = reference.dense_to_sparse([y.detach() for y in ys], w.detach())
    assert any(idx.numel() == 0 for idx in indices), "the case must include a candidate no example uses"
    ys_s = [y.requires_grad_() for y in ys_s]
    w_s = w.detach().clone().requires_grad_()

    dense = bnas_fast.mix(ys, w)
    sparse = bnas_fast.mix_sparse(ys_s, indices, w_s)
    assert_close(sparse, dense, case.dtype, "elementwise", "out")

    g = _grad_out(case, dense.shape)
    gd = torch.autograd.grad(dense, ys + [w], g)
    gs = torch.autograd.grad(sparse, ys_s + [w_s], g)
    for k, idx in enumerate(indices):
        assert_close(gs[k], gd[k][idx], case.dtype, "elementwise", f"grad_ys[{k}]")
        # rows of the dense candidate that the sparse form dropped have zero weight: zero gradient
        dropped = torch.ones(case.batch, dtype=torch.bool)
        dropped[idx] = False
        assert torch.count_nonzero(gd[k][dropped]) == 0
    nz = w.detach() != 0
    assert_close(gs[-1][nz], gd[-1][nz], case.dtype, "reduction", "grad_weights")
    # Where the weight is zero the sparse form never saw the row: its gradient is zero there.
    assert torch.count_nonzero(gs[-1][~nz]) == 0


def test_mix_sparse_with_identity_indices_equals_mix():
    case = Case(7, (3, 5), 3, torch.float64, "dense", True, True)
    ys, w = make_dense(case)
    indices = [torch.arange(7)] * 3
    torch.testing.assert_close(bnas_fast.mix_sparse(ys, indices, w), bnas_fast.mix(ys, w), rtol=0, atol=0)


def test_mix_sparse_uncovered_examples_are_zero():
    ys = [torch.randn(2, 4), torch.randn(0, 4)]
    indices = [torch.tensor([3, 1]), torch.tensor([], dtype=torch.int64)]
    w = torch.ones(5, 2)
    out = bnas_fast.mix_sparse(ys, indices, w)
    assert out.shape == (5, 4)
    assert torch.count_nonzero(out[[0, 2, 4]]) == 0
    torch.testing.assert_close(out[3], ys[0][0])
    torch.testing.assert_close(out[1], ys[0][1])


# ---------------------------------------------------------------------------------------------
# 6. Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True], ids=["mix", "mix_sparse"])
@pytest.mark.parametrize("batch", [1, 123])
def test_deterministic_across_calls_and_thread_counts(sparse, batch):
    case = Case(batch, (64, 9, 9), 3, torch.float32, "zeros", True, True)
    if sparse:
        ys, indices, w = make_sparse(case)
    else:
        ys, w = make_dense(case)
    g = _grad_out(case, (batch,) + case.rest)

    def run():
        out = bnas_fast.mix_sparse(ys, indices, w) if sparse else bnas_fast.mix(ys, w)
        return [out.detach()] + list(torch.autograd.grad(out, ys + [w], g))

    results = [run(), run()]
    with num_threads(1):
        results.append(run())
    with num_threads(2):
        results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 7. Argument errors
# ---------------------------------------------------------------------------------------------
def _w(b=4, k=2, dtype=torch.float32):
    return torch.ones(b, k, dtype=dtype)


def _ys(k=2, b=4, rest=(3,), dtype=torch.float32):
    return [torch.randn((b,) + rest, dtype=dtype) for _ in range(k)]


_I = torch.tensor
BAD_CALLS = {
    "ys_rest_shapes_disagree": (
        lambda: bnas_fast.mix([torch.randn(4, 3), torch.randn(4, 5)], _w()),
        ValueError,
        r"ys\[1\]",
    ),
    "ys_batch_disagrees": (
        lambda: bnas_fast.mix([torch.randn(4, 3), torch.randn(5, 3)], _w()),
        ValueError,
        r"ys\[1\]",
    ),
    "sparse_ys_rest_disagree": (
        lambda: bnas_fast.mix_sparse([torch.randn(1, 3), torch.randn(1, 4)], [_I([0]), _I([1])], _w()),
        ValueError,
        r"ys\[1\]",
    ),
    "K_mismatch": (lambda: bnas_fast.mix(_ys(3), _w(k=2)), ValueError, r"weights has K = 2"),
    "K_mismatch_sparse": (
        lambda: bnas_fast.mix_sparse(_ys(3), [torch.arange(4)] * 3, _w(k=2)),
        ValueError,
        "weights",
    ),
    "int_weights": (lambda: bnas_fast.mix(_ys(), torch.ones(4, 2, dtype=torch.int64)), TypeError, "weights"),
    "int_ys": (lambda: bnas_fast.mix([torch.ones(4, 3, dtype=torch.int32)] * 2, _w()), TypeError, r"ys\[0\]"),
    "float64_ys_float32_weights": (
        lambda: bnas_fast.mix(_ys(dtype=torch.float64), _w()),
        TypeError,
        r"ys\[0\].*weights",
    ),
    "mixed_ys_dtypes": (
        lambda: bnas_fast.mix([torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)], _w()),
        TypeError,
        r"ys\[1\]",
    ),
    "ys_on_meta": (
        lambda: bnas_fast.mix([torch.randn(4, 3), torch.randn(4, 3, device="meta")], _w()),
        ValueError,
        r"ys\[1\]",
    ),
    "weights_on_meta": (lambda: bnas_fast.mix(_ys(), _w().to("meta")), ValueError, r"ys\[0\].*weights"),
    "indices_on_meta": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4, device="meta"), torch.arange(4)], _w()),
        ValueError,
        r"indices\[0\]",
    ),
    "index_out_of_range": (
        lambda: bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 4]), _I([0, 1])], _w()),
        IndexError,
        r"indices\[0\]",
    ),
    "negative_index": (
        lambda: bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 1]), _I([-1, 1])], _w()),
        IndexError,
        r"indices\[1\]",
    ),
    "duplicate_index": (
        lambda: bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 1]), _I([2, 2])], _w()),
        ValueError,
        r"indices\[1\]",
    ),
    "op_index_out_of_range": (
        lambda: torch.ops.bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 4]), _I([0, 1])], _w()),
        IndexError,
        r"indices\[0\]",
    ),
    "op_negative_index": (
        lambda: torch.ops.bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 1]), _I([-1, 1])], _w()),
        IndexError,
        r"indices\[1\]",
    ),
    "op_duplicate_index": (
        lambda: torch.ops.bnas_fast.mix_sparse(_ys(2, b=2), [_I([0, 1]), _I([2, 2])], _w()),
        ValueError,
        r"indices\[1\]",
    ),
    "op_backward_duplicate_index": (
        lambda: torch.ops.bnas_fast.mix_sparse_backward(
            torch.ones(4, 3), _ys(2, b=2), [_I([0, 1]), _I([3, 3])], _w(), True
        ),
        ValueError,
        r"indices\[1\]",
    ),
    "op_index_dtype": (
        lambda: torch.ops.bnas_fast.mix_sparse(
            _ys(2, b=2), [_I([0, 1], dtype=torch.int32), _I([0, 1])], _w()
        ),
        ValueError,
        r"indices\[0\]",
    ),
    "nan_weights": (
        lambda: bnas_fast.mix(_ys(), _w().index_fill(0, _I([2]), float("nan"))),
        ValueError,
        "weights",
    ),
    "inf_weights": (
        lambda: bnas_fast.mix(_ys(), _w().index_fill(0, _I([1]), float("inf"))),
        ValueError,
        "weights",
    ),
    "neg_inf_weights_bf16": (
        lambda: bnas_fast.mix(
            _ys(dtype=torch.bfloat16), _w(dtype=torch.bfloat16).index_fill(0, _I([1]), -float("inf"))
        ),
        ValueError,
        "weights",
    ),
    "nan_weights_sparse": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4)] * 2, _w().index_fill(0, _I([3]), float("nan"))),
        ValueError,
        "weights",
    ),
    "op_nan_weights": (
        lambda: torch.ops.bnas_fast.mix(_ys(), _w().index_fill(0, _I([0]), float("nan"))),
        ValueError,
        "weights",
    ),
    "op_inf_weights": (
        lambda: torch.ops.bnas_fast.mix(_ys(), _w().index_fill(0, _I([0]), float("inf"))),
        ValueError,
        "weights",
    ),
    "op_nan_weights_sparse": (
        lambda: torch.ops.bnas_fast.mix_sparse(
            _ys(), [torch.arange(4)] * 2, _w().index_fill(0, _I([3]), float("nan"))
        ),
        ValueError,
        "weights",
    ),
    "op_inf_weights_float64": (
        lambda: torch.ops.bnas_fast.mix(
            _ys(dtype=torch.float64), _w(dtype=torch.float64).index_fill(0, _I([0]), float("inf"))
        ),
        ValueError,
        "weights",
    ),
    "op_ys_shapes_disagree": (
        lambda: torch.ops.bnas_fast.mix([torch.randn(4, 3), torch.randn(4, 5)], _w()),
        ValueError,
        r"ys\[1\]",
    ),
    "op_K_mismatch": (lambda: torch.ops.bnas_fast.mix(_ys(3), _w(k=2)), ValueError, "weights has K = 2"),
    "stacked_ys": (lambda: bnas_fast.mix(torch.randn(2, 4, 3), _w()), TypeError, r"ys must be a list"),
    "stacked_ys_sparse": (
        lambda: bnas_fast.mix_sparse(torch.randn(2, 4, 3), [torch.arange(4)] * 2, _w()),
        TypeError,
        "ys",
    ),
    "ys_holds_a_non_tensor": (lambda: bnas_fast.mix([torch.randn(4, 3), 1.0], _w()), TypeError, r"ys\[1\]"),
    "empty_ys": (lambda: bnas_fast.mix([], _w(k=0)), ValueError, "ys must hold at least one"),
    "empty_ys_sparse": (
        lambda: bnas_fast.mix_sparse([], [], _w(k=0)),
        ValueError,
        "ys must hold at least one",
    ),
    "weights_1d": (lambda: bnas_fast.mix(_ys(1), torch.ones(4)), ValueError, "weights must have shape"),
    "weights_3d": (lambda: bnas_fast.mix(_ys(2), torch.ones(4, 2, 1)), ValueError, "weights must have shape"),
    "weights_not_a_tensor": (lambda: bnas_fast.mix(_ys(2), [[1.0, 1.0]] * 4), TypeError, "weights"),
    "ys_0d": (lambda: bnas_fast.mix([torch.tensor(1.0)], torch.ones(1, 1)), ValueError, r"ys\[0\]"),
    "indices_int32": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4, dtype=torch.int32), torch.arange(4)], _w()),
        TypeError,
        r"indices\[0\]",
    ),
    "indices_float": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4), torch.arange(4.0)], _w()),
        TypeError,
        r"indices\[1\]",
    ),
    "indices_2d": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4).view(4, 1), torch.arange(4)], _w()),
        TypeError,
        r"indices\[0\]",
    ),
    "indices_length": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(3), torch.arange(4)], _w()),
        ValueError,
        r"indices\[0\]",
    ),
    "indices_count": (
        lambda: bnas_fast.mix_sparse(_ys(), [torch.arange(4)], _w()),
        ValueError,
        "indices holds 1",
    ),
    "indices_stacked": (
        lambda: bnas_fast.mix_sparse(_ys(), torch.arange(8).view(2, 4), _w()),
        TypeError,
        "indices",
    ),
}


# Metadata checks of direct op calls live in the C++ kernels only: the reference kernels that serve
# CPU under BNAS_FAST_BACKEND=reference check values (NaN, index range, duplicates) but trust the
# metadata, which the public functions check.
_CPP_ONLY = {"op_backward_duplicate_index", "op_index_dtype", "op_ys_shapes_disagree", "op_K_mismatch"}
_needs_cpp = pytest.mark.skipif(
    bnas_fast.backends()["cpu"] != "cpp", reason="checked by the C++ kernels only"
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_needs_cpp) if n in _CPP_ONLY else n for n in BAD_CALLS]
)
def test_bad_arguments_raise_naming_the_argument(name):
    call, exc_type, pattern = BAD_CALLS[name]
    with pytest.raises(exc_type, match=pattern):
        call()


def test_large_finite_float64_weights_are_accepted():
    """1e300 is a finite float64 weight; the kernels must not reject it as 'non-finite'."""
    ys = [torch.full((2, 3), 1e-300, dtype=torch.float64)]
    w = torch.full((2, 1), 1e300, dtype=torch.float64)
    out = bnas_fast.mix(ys, w)
    torch.testing.assert_close(out, torch.ones(2, 3, dtype=torch.float64))
    out = bnas_fast.mix_sparse(ys, [torch.tensor([1, 0])], w)
    torch.testing.assert_close(out, torch.ones(2, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# 8. Samplers
# ---------------------------------------------------------------------------------------------
def _assert_binomial(successes: float, n: int, p: float, what: str) -> None:
    """|successes / n - p| within 5 binomial standard deviations."""
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(successes / n - p) <= 5 * sigma + 1e-12, (
        f"{what}: {successes / n:.5f} vs {p:.5f} (5 sigma = {5 * sigma:.5f})"
    )


def test_path_dropout_rate_values():
    assert sampling.path_dropout_rate(0.05, 2) == pytest.approx(0.2236, abs=1e-4)
    assert sampling.path_dropout_rate(0.05, 1) == pytest.approx(0.05)
    assert sampling.path_dropout_rate(0.05, 7) == pytest.approx(0.652, abs=1e-3)
    for r, k in itertools.product((0.01, 0.05, 0.3, 0.9), range(1, 9)):
        # dropping all k paths, each independently with the per-path rate, has probability r
        assert sampling.path_dropout_rate(r, k) ** k == pytest.approx(r)


@pytest.mark.parametrize("k", [2, 5])
def test_all_paths_dropped_with_probability_r(k):
    r, n = 0.05, 100_000
    p = sampling.path_dropout_rate(r, k)
    mask = sampling.path_dropout_mask(n, k, p, ghost_batch_size=1, generator=torch.Generator().manual_seed(k))
    _assert_binomial(int((mask.sum(1) == 0).sum()), n, r, "all paths dropped")


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.7, 1.0])
def test_path_dropout_mask_drop_rate(p):
    n_rows, k = 40_000, 5
    mask = sampling.path_dropout_mask(
        n_rows, k, p, ghost_batch_size=1, generator=torch.Generator().manual_seed(1)
    )
    assert mask.shape == (n_rows, k) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    _assert_binomial(int((mask == 0).sum()), n_rows * k, p, "drop rate")


def test_path_dropout_mask_ghost_batches():
    k, ghost, num_ghost, draws = 4, 8, 16, 200
    p = 0.5
    gen = torch.Generator().manual_seed(3)
    equal_pairs = 0
    for _ in range(draws):
        mask = sampling.path_dropout_mask(ghost * num_ghost, k, p, ghost_batch_size=ghost, generator=gen)
        per_ghost = mask.view(num_ghost, ghost, k)
        # constant within each ghost batch
        assert torch.equal(per_ghost, per_ghost[:, :1].expand_as(per_ghost))
        # consecutive ghost batches: independent masks are equal with probability (p^2 + (1-p)^2)^k
        equal_pairs += int((per_ghost[1:, 0] == per_ghost[:-1, 0]).all(1).sum())
    n_pairs = draws * (num_ghost - 1)
    _assert_binomial(
        equal_pairs, n_pairs, (p * p + (1 - p) ** 2) ** k, "identical neighbouring ghost batches"
    )

    whole = sampling.path_dropout_mask(32, 6, 0.5, generator=gen)  # ghost_batch_size=None: one mask
    assert torch.equal(whole, whole[:1].expand_as(whole))
    per_example = sampling.path_dropout_mask(512, 6, 0.5, ghost_batch_size=1, generator=gen)
    assert per_example.unique(dim=0).shape[0] > 32  # 64 possible rows, 512 draws


@pytest.mark.parametrize("p,k", [(0.9, 3), (0.5, 2), (0.99, 4), (1.0, 3)])
def test_keep_at_least_one(p, k):
    n = 40_000
    mask = sampling.path_dropout_mask(
        n, k, p, ghost_batch_size=1, keep_at_least_one=True, generator=torch.Generator().manual_seed(5)
    )
    assert bool((mask.sum(1) >= 1).all()), "an all-zero row"
    q = 1 - p + p**k / k
    for j in range(k):  # rows are independent; entries of one row are not
        _assert_binomial(int(mask[:, j].sum()), n, q, f"keep rate of path {j}")
    if p == 1.0:
        assert bool((mask.sum(1) == 1).all())


def test_path_dropout_mask_reproducible():
    args = (64, 5, 0.4)
    a = sampling.path_dropout_mask(*args, ghost_batch_size=4, generator=torch.Generator().manual_seed(11))
    b = sampling.path_dropout_mask(*args, ghost_batch_size=4, generator=torch.Generator().manual_seed(11))
    c = sampling.path_dropout_mask(*args, ghost_batch_size=4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = sampling.path_dropout_mask(*args, ghost_batch_size=1, keep_at_least_one=True)
    torch.manual_seed(7)
    e = sampling.path_dropout_mask(*args, ghost_batch_size=1, keep_at_least_one=True)
    f = sampling.path_dropout_mask(*args, ghost_batch_size=1, keep_at_least_one=True)
    assert torch.equal(d, e) and not torch.equal(e, f)


def test_path_dropout_mask_dtype_and_device():
    m = sampling.path_dropout_mask(6, 3, 0.5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.float64 and m.device.type == "cpu"
    m = sampling.path_dropout_mask(6, 3, 0.5, device="meta", dtype=torch.bfloat16)
    assert m.device.type == "meta" and m.dtype == torch.bfloat16 and m.shape == (6, 3)


def test_linear_schedule_and_path_dropout_schedule():
    assert sampling.linear_schedule(0, 100, 0.4) == 0.0
    assert sampling.linear_schedule(25, 100, 0.4) == pytest.approx(0.1)
    assert sampling.linear_schedule(50, 100, 0.4) == pytest.approx(0.2)
    assert sampling.linear_schedule(100, 100, 0.4) == pytest.approx(0.4)
    assert sampling.linear_schedule(1000, 100, 0.4) == pytest.approx(0.4)
    for args, name in (((float("nan"), 10, 0.5), "step"), ((5, float("nan"), 0.5), "total_steps"),
                       ((5, float("inf"), 0.5), "total_steps"), ((5, 10, None), "final_rate"),
                       ((5, 10, float("nan")), "final_rate")):
        with pytest.raises(ValueError, match=f"linear_schedule: {name} must"):
            sampling.linear_schedule(*args)

    s = sampling.PathDropoutSchedule(r=0.05, total_steps=1000)
    full = math.sqrt(0.05)
    assert s.rate(0, 2) == 0.0
    assert s.rate(500, 2) == pytest.approx(full / 2)
    assert s.rate(1000, 2) == pytest.approx(full)
    assert s.rate(10_000, 2) == pytest.approx(full)
    assert s.rate(1000, 1) == pytest.approx(0.05)
    assert s.rate(1000, 7) ** 7 == pytest.approx(0.05)
    assert "0.05" in repr(s) and "1000" in repr(s)


SAMPLER_BAD_CALLS = {
    "r_zero": (lambda: sampling.path_dropout_rate(0.0, 2), r"\br must"),
    "r_one": (lambda: sampling.path_dropout_rate(1.0, 2), r"\br must"),
    "r_negative": (lambda: sampling.path_dropout_rate(-0.1, 2), r"\br must"),
    "r_above_one": (lambda: sampling.path_dropout_rate(1.5, 2), r"\br must"),
    "r_nan": (lambda: sampling.path_dropout_rate(float("nan"), 2), r"\br must"),
    "fan_in_zero": (lambda: sampling.path_dropout_rate(0.05, 0), "fan_in"),
    "fan_in_float": (lambda: sampling.path_dropout_rate(0.05, 2.0), "fan_in"),
    "schedule_r": (lambda: sampling.PathDropoutSchedule(r=1.2, total_steps=10), r"\br must"),
    "schedule_total_steps": (lambda: sampling.PathDropoutSchedule(r=0.1, total_steps=0), "total_steps"),
    "schedule_fan_in": (lambda: sampling.PathDropoutSchedule(r=0.1, total_steps=10).rate(3, 0), "fan_in"),
    "linear_total_steps": (lambda: sampling.linear_schedule(1, 0, 0.5), "total_steps"),
    "linear_step": (lambda: sampling.linear_schedule(-1, 10, 0.5), "step"),
    "linear_final_rate_nan": (lambda: sampling.linear_schedule(1, 10, float("nan")), "final_rate"),
    "linear_final_rate_big": (lambda: sampling.linear_schedule(1, 10, 1.5), "final_rate"),
    "ghost_not_dividing": (
        lambda: sampling.path_dropout_mask(10, 3, 0.5, ghost_batch_size=3),
        "ghost_batch_size",
    ),
    "ghost_zero": (lambda: sampling.path_dropout_mask(10, 3, 0.5, ghost_batch_size=0), "ghost_batch_size"),
    "drop_rate_nan": (lambda: sampling.path_dropout_mask(10, 3, float("nan")), "drop_rate"),
    "drop_rate_above_one": (lambda: sampling.path_dropout_mask(10, 3, 1.01), "drop_rate"),
    "drop_rate_negative": (lambda: sampling.path_dropout_mask(10, 3, -0.01), "drop_rate"),
    "batch_size_zero": (lambda: sampling.path_dropout_mask(0, 3, 0.5), "batch_size"),
    "num_paths_zero": (lambda: sampling.path_dropout_mask(4, 0, 0.5), "num_paths"),
}


@pytest.mark.parametrize("name", list(SAMPLER_BAD_CALLS))
def test_sampler_bad_arguments_raise_value_error(name):
    call, pattern = SAMPLER_BAD_CALLS[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_arch_weights_gathers_rows_and_gradients_reach_the_table():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(5, 3, generator=gen, requires_grad=True)
    arch = torch.tensor([4, 0, 4, 2, 2, 2])
    w = bnas_fast.arch_weights(arch, table)
    assert torch.equal(w, table.detach()[arch]) and torch.equal(w, sampling.arch_weights(arch, table))
    assert torch.equal(w, reference.arch_weights(arch, table))
    g = torch.randn(6, 3, generator=gen)
    (w * g).sum().backward()
    expected = torch.zeros(5, 3).index_add_(0, arch, g)
    torch.testing.assert_close(table.grad, expected)
    assert torch.count_nonzero(table.grad[[1, 3]]) == 0 and torch.count_nonzero(table.grad[[0, 2, 4]]) > 0


def test_arch_weights_feed_mix():
    """Per-example architectures: weights from the table, gradient reaches the table through mix."""
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    arch = torch.tensor([0, 2, 1])
    ys = [torch.randn(3, 4), torch.randn(3, 4)]
    out = bnas_fast.mix(ys, bnas_fast.arch_weights(arch, table))
    torch.testing.assert_close(out, reference.mix(ys, table.detach()[arch]))
    out.sum().backward()
    expected = torch.zeros(3, 2)
    for b, s in enumerate(arch.tolist()):
        expected[s] += torch.stack([ys[0][b].sum(), ys[1][b].sum()])
    torch.testing.assert_close(table.grad, expected)


@pytest.mark.parametrize(
    "arch,exc,pattern",
    [
        (torch.tensor([0, 5]), IndexError, r"\barch\b"),
        (torch.tensor([-1, 0]), IndexError, r"\barch\b"),
        (torch.tensor([0, 1], dtype=torch.int32), TypeError, r"\barch\b"),
        (torch.tensor([0.0, 1.0]), TypeError, r"\barch\b"),
        (torch.tensor([[0, 1]]), TypeError, r"\barch\b"),
        ([0, 1], TypeError, r"\barch\b"),
    ],
    ids=["too_big", "negative", "int32", "float", "2d", "list"],
)
def test_arch_weights_bad_arch(arch, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bnas_fast.arch_weights(arch, torch.randn(5, 3))


def test_arch_weights_bad_table():
    with pytest.raises(ValueError, match="table"):
        bnas_fast.arch_weights(torch.tensor([0]), torch.randn(5))
    with pytest.raises(ValueError, match="arch"):
        bnas_fast.arch_weights(torch.tensor([0], device="meta"), torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------
# 9. MixedOp
# ---------------------------------------------------------------------------------------------
def _conv_candidates():
    torch.manual_seed(0)
    return [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()),
        nn.Conv2d(3, 4, 5, padding=2),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU()),
    ]


def _bn_candidates():
    torch.manual_seed(0)
    cands = [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)),
        nn.Conv2d(3, 4, 1),
    ]
    for c in cands:  # non-trivial running statistics and affine parameters
        for m in c.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return cands


# column 0: every example (runs on x itself); 1 and 2: some; 3: none; row 5: all kept; row 3: only 0
_STRUCTURED = torch.tensor(
    [[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.float64
)


def _mixed_op_weights(kind: str) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    if kind == "structured":
        return _STRUCTURED.clone()
    if kind == "random_mask":  # per-example path dropout, plus an example that drops every path
        mask = sampling.path_dropout_mask(6, 4, 0.5, ghost_batch_size=1, generator=gen, dtype=torch.float64)
        mask[5] = 0
        return mask
    if kind == "scaled_mask":  # aggregation coefficients on a dropped-path pattern
        return _STRUCTURED * torch.rand(6, 4, generator=gen, dtype=torch.float64).add(0.5)
    raise AssertionError(kind)


def _run(op: MixedOp, x: Tensor, weights: Tensor, g: Tensor):
    out = op(x, weights)
    params = list(op.parameters())
    grads = torch.autograd.grad(out, [x, weights] + params, g, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("kind", ["structured", "random_mask", "scaled_mask"])
def test_mixed_op_sparse_equals_dense(kind):
    candidates = [c.double() for c in _conv_candidates()]
    sparse_op, dense_op = MixedOp(candidates, sparse=True), MixedOp(candidates, sparse=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = _mixed_op_weights(kind).requires_grad_()
    g = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    out_s, grads_s = _run(sparse_op, x, w, g)
    out_d, grads_d = _run(dense_op, x, w, g)
    torch.testing.assert_close(out_s, out_d)
    assert out_s.abs().sum() > 0
    torch.testing.assert_close(grads_s[0], grads_d[0])  # x
    for i, (a, b) in enumerate(zip(grads_s[2:], grads_d[2:])):  # candidates' parameters
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, msg=f"parameter {i}")
    nz = w.detach() != 0
    torch.testing.assert_close(grads_s[1][nz], grads_d[1][nz])  # weights, where not dropped
    assert torch.count_nonzero(grads_s[1][~nz]) == 0  # structural zeros: no gradient in sparse mode


def test_mixed_op_batchnorm_eval_sparse_equals_dense():
    candidates = [c.double().eval() for c in _bn_candidates()]
    sparse_op, dense_op = MixedOp(candidates, sparse=True), MixedOp(candidates, sparse=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = _mixed_op_weights("scaled_mask").requires_grad_()
    g = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    out_s, grads_s = _run(sparse_op, x, w, g)
    out_d, grads_d = _run(dense_op, x, w, g)
    torch.testing.assert_close(out_s, out_d)
    torch.testing.assert_close(grads_s[0], grads_d[0])
    for a, b in zip(grads_s[2:], grads_d[2:]):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)


def test_mixed_op_batchnorm_train_sees_only_its_examples():
    """In training mode a BatchNorm inside a candidate normalises over the examples that run it
    (ghost-batch semantics), so sparse and dense differ; sparse equals running each candidate on
    its own examples."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64)
    w = _mixed_op_weights("structured")
    sparse_op = MixedOp([c.double().train() for c in _bn_candidates()], sparse=True)
    manual_cands = copy.deepcopy(sparse_op.candidates)
    dense_op = MixedOp(copy.deepcopy(sparse_op.candidates), sparse=False)
    out_s = sparse_op(x, w)
    ys, indices = [], []
    for k, c in enumerate(manual_cands):
        idx = (w[:, k] != 0).nonzero().flatten()
        indices.append(idx)
        ys.append(c(x[idx]) if idx.numel() else x.new_empty(0, 4, 5, 5))
    torch.testing.assert_close(out_s, reference.mix_sparse(ys, indices, w))
    assert not torch.allclose(out_s, dense_op(x, w))
    # running statistics were updated from the same examples
    bn_s, bn_m = sparse_op.candidates[1][1], manual_cands[1][1]
    torch.testing.assert_close(bn_s.running_mean, bn_m.running_mean)


class _Recorder:
    """Forward pre-hooks recording the input each candidate is called with."""

    def __init__(self, op: MixedOp):
        self.inputs = {k: [] for k in range(len(op.candidates))}
        self.handles = [
            c.register_forward_pre_hook(lambda mod, args, k=k: self.inputs[k].append(args[0]))
            for k, c in enumerate(op.candidates)
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["structured", "random_mask"])
def test_mixed_op_runs_each_candidate_only_on_its_examples(kind):
    op = MixedOp([c.double() for c in _conv_candidates()])
    rec = _Recorder(op)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    w = _mixed_op_weights(kind)
    op(x, w)
    rec.remove()
    counts = (w != 0).sum(0).tolist()
    if kind == "structured":
        assert counts == [6, 3, 4, 0]
    for k, calls in rec.inputs.items():
        if counts[k] == 0:
            assert calls == [], f"candidate {k} is used by no example but was called"
            continue
        assert len(calls) == 1, f"candidate {k} called {len(calls)} times"
        assert calls[0].shape[0] == counts[k]  # the saving is real: only the examples that use it
        if counts[k] == 6:
            assert calls[0] is x  # used by every example: runs on x itself, no gather
        else:
            assert torch.equal(calls[0], x[(w[:, k] != 0).nonzero().flatten()])


def test_mixed_op_dense_mode_runs_every_candidate_on_x():
    op = MixedOp([c.double() for c in _conv_candidates()], sparse=False)
    rec = _Recorder(op)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    op(x, _STRUCTURED.clone())
    rec.remove()
    assert all(len(v) == 1 and v[0] is x for v in rec.inputs.values())


@pytest.mark.parametrize("sparse", [True, False])
def test_mixed_op_all_weights_zero_returns_zeros(sparse):
    op = MixedOp([c.double() for c in _conv_candidates()], sparse=sparse)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
    out = op(x, w)
    assert out.shape == (6, 4, 5, 5) and out.dtype == torch.float64
    assert torch.count_nonzero(out) == 0
    out.sum().backward()  # stays in the graph (through the weights)
    assert w.grad is not None
    assert x.grad is None or torch.count_nonzero(x.grad) == 0


def test_mixed_op_all_weights_zero_moves_no_batchnorm_statistics():
    torch.manual_seed(0)
    candidates = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(2)]
    op = MixedOp(candidates).train()
    before = [c[1].running_mean.clone() for c in candidates]
    out = op(torch.randn(6, 3, 5, 5), torch.zeros(6, 2))
    assert out.shape == (6, 4, 5, 5) and torch.count_nonzero(out) == 0
    for c, mean in zip(candidates, before):
        assert torch.equal(c[1].running_mean, mean)
        assert c.training  # the shape probe restored the mode


@pytest.mark.parametrize(
    "weights,pattern",
    [
        (torch.ones(6, 3), r"weights must have shape \[B, 4\]"),
        (torch.ones(6, 5), r"weights must have shape \[B, 4\]"),
        (torch.ones(6), r"weights must have shape \[B, 4\]"),
        (torch.ones(6, 4, 1), r"weights must have shape \[B, 4\]"),
        ([[1.0] * 4] * 6, r"weights must have shape \[B, 4\]"),
        (torch.ones(5, 4), "weights has B = 5"),
    ],
    ids=["K_too_small", "K_too_big", "1d", "3d", "list", "batch"],
)
def test_mixed_op_bad_weights(weights, pattern):
    op = MixedOp(_conv_candidates())
    with pytest.raises(ValueError, match=pattern):
        op(torch.randn(6, 3, 5, 5), weights)


def test_mixed_op_bad_candidates():
    with pytest.raises(ValueError, match="candidates"):
        MixedOp([])
    with pytest.raises(TypeError, match=r"candidates\[1\]"):
        MixedOp([nn.ReLU(), lambda x: x])


# ---------------------------------------------------------------------------------------------
# Memory layouts: candidates that share a dense non-contiguous layout (channels-last) are mixed
# on permuted views, and the output and gradients keep that layout.
# ---------------------------------------------------------------------------------------------
def _channels_last(shape, gen, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_candidates_keep_their_layout(dtype):
    gen = torch.Generator().manual_seed(21)
    ys = [_channels_last((6, 5, 4, 3), gen, dtype) for _ in range(3)]
    w = torch.rand(6, 3, generator=gen, dtype=dtype)
    w[2, 1] = 0.0
    w.requires_grad_()
    out = bnas_fast.mix(ys, w)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    ref = reference.mix([y.contiguous() for y in ys64], w64)
    assert_close(out, ref, dtype, "elementwise", "out")
    g = torch.randn(out.shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(out, ys + [w], g)
    expected = torch.autograd.grad(ref, ys64 + [w64], g.double())
    for k in range(3):
        assert grads[k].is_contiguous(memory_format=torch.channels_last)
        assert_close(grads[k], expected[k], dtype, "elementwise", f"grad_ys[{k}]")
    assert_close(grads[3], expected[3], dtype, "reduction", "grad_weights")


def test_channels_last_gradients_from_a_contiguous_grad_and_gradcheck():
    gen = torch.Generator().manual_seed(22)
    ys = [_channels_last((4, 3, 2, 5), gen) for _ in range(2)]
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    out = bnas_fast.mix(ys, w)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # contiguous: read through a copy
    grads = torch.autograd.grad(out, ys + [w], g)
    expected = torch.autograd.grad(reference.mix(ys, w), ys + [w], g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda w, *ys: bnas_fast.mix(list(ys), w), (w, *ys))


def test_mixed_layouts_fall_back_to_contiguous_copies():
    gen = torch.Generator().manual_seed(23)
    ys = [_channels_last((4, 3, 2, 5), gen), torch.randn(4, 3, 2, 5, generator=gen, dtype=torch.float64)]
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    out = bnas_fast.mix(ys, w)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference.mix(ys, w))


def test_channels_last_sparse_candidates_keep_their_layout():
    gen = torch.Generator().manual_seed(24)
    indices = [torch.tensor([0, 3]), torch.tensor([1, 2, 4]), torch.tensor([4])]
    ys = [_channels_last((len(i), 3, 2, 5), gen) for i in indices]
    w = torch.rand(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    out = bnas_fast.mix_sparse(ys, indices, w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = reference.mix_sparse([y.contiguous() for y in ys], indices, w)
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, ys + [w], g), torch.autograd.grad(ref, ys + [w], g)):
        torch.testing.assert_close(a, b)


def test_channels_last_under_torch_compile():
    gen = torch.Generator().manual_seed(25)
    ys = [_channels_last((4, 3, 2, 5), gen) for _ in range(2)]
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    compiled = torch.compile(lambda ys, w: bnas_fast.mix(ys, w), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ys, w), reference.mix(ys, w))


# ---------------------------------------------------------------------------------------------
# relu=True: the sum and the ReLU after it in one pass (op mix_relu), the backward masked by the
# saved output.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rest", [(3,), (3, 5, 7), (64, 9, 9)], ids=str)
def test_mix_relu_matches_reference(dtype, rest):
    gen = torch.Generator().manual_seed(31)
    ys = [torch.randn((7,) + rest, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]
    w = torch.rand(7, 3, generator=gen, dtype=torch.float64).to(dtype)
    w[2, 0] = 0.0
    w.requires_grad_()
    out = bnas_fast.mix(ys, w, relu=True)
    assert bool((out >= 0).all()) and bool((out == 0).any())
    ys64, w64 = _float64_leaves(ys), w.detach().double().requires_grad_()
    ref = reference.mix(ys64, w64, relu=True)
    assert_close(out, ref, dtype, "elementwise", "out")
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, ys + [w], g)
    expected = torch.autograd.grad(ref, ys64 + [w64], g.double())
    for k in range(3):
        assert_close(grads[k], expected[k], dtype, "elementwise", f"grad_ys[{k}]")
    assert_close(grads[3], expected[3], dtype, "reduction", "grad_weights")


def test_mix_relu_op_gradcheck_opcheck_and_compile():
    gen = torch.Generator().manual_seed(32)
    ys = [torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.rand(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *ys: bnas_fast.mix(list(ys), w, relu=True), (w, *ys))
    assert torch.autograd.gradcheck(lambda w, *ys: torch.ops.bnas_fast.mix_relu(list(ys), w), (w, *ys))
    torch.library.opcheck(torch.ops.bnas_fast.mix_relu.default, (ys, w))
    out = bnas_fast.mix(ys, w, relu=True)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    relu_out = reference.mix(ys, w, relu=True).detach()
    torch.library.opcheck(torch.ops.bnas_fast.mix_backward.default, (grad, ys, w, True, relu_out))
    compiled = torch.compile(lambda ys, w: bnas_fast.mix(ys, w, relu=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ys, w), reference.mix(ys, w, relu=True))
    # the registered op and the eager route agree bit for bit, forward and backward
    op_out = torch.ops.bnas_fast.mix_relu(ys, w)
    assert torch.equal(op_out, out)
    for a, b in zip(torch.autograd.grad(op_out, ys + [w], grad), torch.autograd.grad(out, ys + [w], grad)):
        assert torch.equal(a, b)


def test_mix_relu_keeps_channels_last_and_checks_its_flag():
    gen = torch.Generator().manual_seed(33)
    ys = [torch.randn(4, 3, 2, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
          for _ in range(2)]
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    out = bnas_fast.mix(ys, w, relu=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.mix(ys, w, relu=True))
    with pytest.raises(TypeError, match="relu must be a bool"):
        bnas_fast.mix(ys, w, relu=1)


def test_mix_backward_checks_relu_out():
    ys = [torch.randn(4, 5) for _ in range(2)]
    w, g = torch.rand(4, 2), torch.randn(4, 5)
    with pytest.raises(ValueError, match="relu_out"):
        torch.ops.bnas_fast.mix_backward(g, ys, w, True, torch.randn(4, 6))
    with pytest.raises(ValueError, match="relu_out"):
        torch.ops.bnas_fast.mix_backward(g, ys, w, True, torch.randn(4, 5, dtype=torch.float64))


def test_mix_relu_keeps_a_nan_sum():
    """As torch.relu (the reference): a NaN sum stays NaN, in the vectorised blocks and the tail."""
    y = torch.randn(3, 70)
    y[0, 5] = float("nan")  # in a block
    y[2, 69] = float("nan")  # in the tail
    w = torch.ones(3, 1)
    out = torch.ops.bnas_fast.mix_relu([y], w)
    expected = reference.mix([y], w, relu=True)
    assert torch.equal(out.isnan(), expected.isnan()) and int(out.isnan().sum()) == 2
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("bad", ["nan", "int"])
def test_mixed_op_refuses_bad_weights_before_any_candidate_runs(sparse, bad):
    """A refused call must leave the candidates' BatchNorm statistics as they were (a review of
    2026-12-02: the weights were checked by mix after the candidates had run), and name MixedOp."""
    op = MixedOp([nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)), nn.Identity()], sparse=sparse).train()
    before = copy.deepcopy(op.state_dict())
    weights = torch.ones(4, 2) if bad == "nan" else torch.ones(4, 2, dtype=torch.long)
    if bad == "nan":
        weights[1, 0] = float("nan")
    with pytest.raises((ValueError, TypeError), match=r"MixedOp: weights (contains a non-finite value|must be a floating-point)"):
        op(torch.randn(4, 2, 3, 3), weights)
    for name, value in op.state_dict().items():
        assert torch.equal(value, before[name]), name
