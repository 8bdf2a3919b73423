"""The Triton mix kernels against bnas_fast.reference, run by Triton's interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs each program
in Python, so the tensors here are small; the whole file takes a few tens of seconds.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from bnas_fast import reference  # noqa: E402
from bnas_fast.triton import mix as triton_mix  # noqa: E402

# bfloat16 runs under the interpreter, but its float32 -> bfloat16 cast truncates instead of
# rounding to nearest (as the GPU does), so low-precision results may differ from the reference
# by one unit in the last place: hence rtol 1e-2 (> 2^-7) for them.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}

K_OVER_LIMIT = triton_mix.MAX_CANDIDATES_PER_LAUNCH + 1  # two chained launches


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def assert_grads_close(actual, expected):
    (grad_ys, grad_w), (ref_grad_ys, ref_grad_w) = actual, expected
    assert len(grad_ys) == len(ref_grad_ys)
    for g, r in zip(grad_ys, ref_grad_ys):
        assert_close(g, r)
    assert_close(grad_w, ref_grad_w)


def non_contiguous(t):
    """The same values as t in a strided (non-contiguous) view."""
    wide = torch.zeros(t.shape + (2,), dtype=t.dtype)
    wide[..., 1] = t
    view = wide[..., 1]
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def make_weights(batch, num_candidates, dtype, gen):
    """Random weights with about 40% zeros, and an example whose weights are all zero."""
    w = torch.randn(batch, num_candidates, generator=gen).to(dtype)
    w[torch.rand(batch, num_candidates, generator=gen) < 0.4] = 0
    if batch > 2:
        w[batch // 2] = 0
    return w


def make_sparse(batch, num_candidates, rest, dtype, gen):
    """Candidates computed on random subsets of the batch (in random order); candidate 1 is empty."""
    ys, indices = [], []
    for k in range(num_candidates):
        n = 0 if k == 1 else int(torch.randint(0, batch + 1, (1,), generator=gen))
        indices.append(torch.randperm(batch, generator=gen)[:n])
        ys.append(torch.randn((n,) + rest, generator=gen).to(dtype))
    return ys, indices


# (B, rest, K). The interpreter runs one Python program per example, so the large batch is kept to
# one K and one dtype; K = 9 > 8 exercises the chained launches.
CASES = [
    (1, (3, 5, 7), 1),
    (1, (3, 5, 7), 3),
    (1, (3, 5, 7), K_OVER_LIMIT),
    (7, (3, 1, 1), 1),
    (7, (3, 1, 1), 3),
    (7, (3, 1, 1), K_OVER_LIMIT),
    (123, (3, 1, 1), 3),
]
DTYPE_CASES = [
    pytest.param(dtype, batch, rest, k, id=f"{str(dtype)[6:]}-B{batch}-rest{'x'.join(map(str, rest))}-K{k}")
    for dtype in (torch.float32, torch.float64)
    for batch, rest, k in CASES
    if batch < 100 or dtype == torch.float32
]


@pytest.mark.parametrize("dtype,batch,rest,num_candidates", DTYPE_CASES)
def test_mix_dense(dtype, batch, rest, num_candidates):
    gen = torch.Generator().manual_seed(batch * 100 + num_candidates)
    ys = [torch.randn((batch,) + rest, generator=gen).to(dtype) for _ in range(num_candidates)]
    w = make_weights(batch, num_candidates, dtype, gen)
    grad_out = torch.randn((batch,) + rest, generator=gen).to(dtype)

    out = triton_mix.mix(ys, w)
    assert out.is_contiguous()
    assert_close(out, reference.mix(ys, w))
    for wrg in (True, False):
        assert_grads_close(
            triton_mix.mix_backward(grad_out, ys, w, wrg), reference.mix_backward(grad_out, ys, w, wrg)
        )


@pytest.mark.parametrize("dtype,batch,rest,num_candidates", DTYPE_CASES)
def test_mix_relu(dtype, batch, rest, num_candidates):
    """relu of the sum (the last chunk of candidates applies it) and the backward masked by the
    output, against the reference."""
    gen = torch.Generator().manual_seed(batch * 100 + num_candidates + 7)
    ys = [torch.randn((batch,) + rest, generator=gen).to(dtype) for _ in range(num_candidates)]
    w = make_weights(batch, num_candidates, dtype, gen)
    grad_out = torch.randn((batch,) + rest, generator=gen).to(dtype)
    out = triton_mix.mix(ys, w, relu=True)
    expected = reference.mix(ys, w, relu=True)
    assert_close(out, expected)
    for wrg in (True, False):
        assert_grads_close(
            triton_mix.mix_backward(grad_out, ys, w, wrg, expected),
            reference.mix_backward(grad_out, ys, w, wrg, expected),
        )


@pytest.mark.parametrize("dtype,batch,rest,num_candidates", DTYPE_CASES)
def test_mix_sparse(dtype, batch, rest, num_candidates):
    gen = torch.Generator().manual_seed(batch * 100 + num_candidates + 1)
    ys, indices = make_sparse(batch, num_candidates, rest, dtype, gen)
    w = make_weights(batch, num_candidates, dtype, gen)
    grad_out = torch.randn((batch,) + rest, generator=gen).to(dtype)

    out = triton_mix.mix_sparse(ys, indices, w)
    assert_close(out, reference.mix_sparse(ys, indices, w))
    for wrg in (True, False):
        assert_grads_close(
            triton_mix.mix_sparse_backward(grad_out, ys, indices, w, wrg),
            reference.mix_sparse_backward(grad_out, ys, indices, w, wrg),
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_candidates", [3, K_OVER_LIMIT])
def test_low_precision(dtype, num_candidates):
    """float32 accumulation, also carried across the chained launches of K > 8."""
    batch, rest = 7, (3, 5, 1)
    gen = torch.Generator().manual_seed(num_candidates)
    ys = [torch.randn((batch,) + rest, generator=gen).to(dtype) for _ in range(num_candidates)]
    w = make_weights(batch, num_candidates, dtype, gen)
    grad_out = torch.randn((batch,) + rest, generator=gen).to(dtype)
    assert_close(triton_mix.mix(ys, w), reference.mix(ys, w))
    assert_grads_close(
        triton_mix.mix_backward(grad_out, ys, w, True), reference.mix_backward(grad_out, ys, w, True)
    )
    sparse_ys, indices = make_sparse(batch, num_candidates, rest, dtype, gen)
    assert_close(triton_mix.mix_sparse(sparse_ys, indices, w), reference.mix_sparse(sparse_ys, indices, w))
    assert_grads_close(
        triton_mix.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
        reference.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_several_tiles_per_row(monkeypatch, dtype):
    """Rows split over several programs (with a partial last tile), and grad_w summed over tiles."""
    monkeypatch.setattr(triton_mix, "MAX_BLOCK", 16)
    batch, rest, num_candidates = 3, (3, 5, 7), K_OVER_LIMIT  # 105 elements: 7 tiles of 16
    gen = torch.Generator().manual_seed(5)
    ys = [torch.randn((batch,) + rest, generator=gen).to(dtype) for _ in range(num_candidates)]
    w = make_weights(batch, num_candidates, dtype, gen)
    grad_out = torch.randn((batch,) + rest, generator=gen).to(dtype)
    assert_close(triton_mix.mix(ys, w), reference.mix(ys, w))
    assert_grads_close(
        triton_mix.mix_backward(grad_out, ys, w, True), reference.mix_backward(grad_out, ys, w, True)
    )
    sparse_ys, indices = make_sparse(batch, num_candidates, rest, dtype, gen)
    assert_grads_close(
        triton_mix.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
        reference.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
    )


@pytest.mark.parametrize("num_candidates", [3, K_OVER_LIMIT])
def test_non_contiguous_inputs(num_candidates):
    batch, rest, dtype = 7, (3, 5, 1), torch.float64
    gen = torch.Generator().manual_seed(11)
    ys = [
        non_contiguous(torch.randn((batch,) + rest, generator=gen, dtype=dtype))
        for _ in range(num_candidates)
    ]
    w = make_weights(num_candidates, batch, dtype, gen).t()  # [B, K] view of a [K, B] tensor
    assert not w.is_contiguous()
    grad_out = non_contiguous(torch.randn((batch,) + rest, generator=gen, dtype=dtype))
    out = triton_mix.mix(ys, w)
    assert out.is_contiguous()
    assert_close(out, reference.mix(ys, w))
    assert_grads_close(
        triton_mix.mix_backward(grad_out, ys, w, True), reference.mix_backward(grad_out, ys, w, True)
    )
    sparse_ys, indices = make_sparse(batch, num_candidates, rest, dtype, gen)
    sparse_ys = [non_contiguous(y) for y in sparse_ys]
    indices = [non_contiguous(i) for i in indices]
    assert_close(triton_mix.mix_sparse(sparse_ys, indices, w), reference.mix_sparse(sparse_ys, indices, w))
    assert_grads_close(
        triton_mix.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
        reference.mix_sparse_backward(grad_out, sparse_ys, indices, w, True),
    )


@pytest.mark.parametrize("num_candidates", [3, K_OVER_LIMIT])
def test_zero_weight_rows_are_not_read(num_candidates):
    """Rows whose weight is zero hold NaN: they must not reach the output (the reference, which
    multiplies them by zero, would give NaN), nor grad_ys when grad_w is not wanted."""
    batch, rest, dtype = 7, (3, 1, 1), torch.float32
    gen = torch.Generator().manual_seed(13)
    w = make_weights(batch, num_candidates, dtype, gen)
    clean = [torch.randn((batch,) + rest, generator=gen) for _ in range(num_candidates)]
    poisoned = [y.clone() for y in clean]
    for k, y in enumerate(poisoned):
        y[w[:, k] == 0] = float("nan")
    grad_out = torch.randn((batch,) + rest, generator=gen)

    out = triton_mix.mix(poisoned, w)
    assert not out.isnan().any()
    assert_close(out, reference.mix(clean, w))
    assert_grads_close(
        triton_mix.mix_backward(grad_out, poisoned, w, False),
        reference.mix_backward(grad_out, clean, w, False),
    )
    # Sparse: candidate k computed every example, but some of its weights are zero.
    indices = [torch.arange(batch) for _ in range(num_candidates)]
    assert_close(triton_mix.mix_sparse(poisoned, indices, w), reference.mix_sparse(clean, indices, w))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch,rest", [(0, (3, 2)), (4, (3, 0)), (0, (0,))])
def test_empty(sparse, batch, rest):
    """B = 0 or M = 0: no launch, outputs of the right shapes, zero grad_w."""
    dtype, num_candidates = torch.float32, K_OVER_LIMIT
    ys = [torch.randn((batch,) + rest, dtype=dtype) for _ in range(num_candidates)]
    indices = [torch.arange(batch) for _ in range(num_candidates)]
    w = torch.randn(batch, num_candidates, dtype=dtype)
    grad_out = torch.randn((batch,) + rest, dtype=dtype)
    if sparse:
        out = triton_mix.mix_sparse(ys, indices, w)
    else:
        out = triton_mix.mix(ys, w)
    assert_close(out, torch.zeros((batch,) + rest, dtype=dtype))
    for wrg in (True, False):
        if sparse:
            actual = triton_mix.mix_sparse_backward(grad_out, ys, indices, w, wrg)
        else:
            actual = triton_mix.mix_backward(grad_out, ys, w, wrg)
        assert_grads_close(actual, ([torch.zeros_like(y) for y in ys], torch.zeros_like(w)))


def test_sparse_all_candidates_empty():
    """n_k = 0 for every k: the output is all zeros, the gradients are empty or zero."""
    batch, rest, dtype, num_candidates = 5, (3, 2), torch.float32, 3
    ys = [torch.randn((0,) + rest, dtype=dtype) for _ in range(num_candidates)]
    indices = [torch.zeros(0, dtype=torch.int64) for _ in range(num_candidates)]
    w = torch.randn(batch, num_candidates, dtype=dtype)
    grad_out = torch.randn((batch,) + rest, dtype=dtype)
    assert_close(triton_mix.mix_sparse(ys, indices, w), torch.zeros((batch,) + rest, dtype=dtype))
    assert_grads_close(
        triton_mix.mix_sparse_backward(grad_out, ys, indices, w, True),
        ([torch.zeros_like(y) for y in ys], torch.zeros_like(w)),
    )


def test_backward_is_deterministic():
    """grad_w is reduced from per-tile partials without atomics: two runs agree bit for bit."""
    batch, rest, num_candidates = 3, (3, 5, 7), 3
    gen = torch.Generator().manual_seed(17)
    ys = [torch.randn((batch,) + rest, generator=gen) for _ in range(num_candidates)]
    w = torch.randn(batch, num_candidates, generator=gen)
    grad_out = torch.randn((batch,) + rest, generator=gen)
    first = triton_mix.mix_backward(grad_out, ys, w, True)
    second = triton_mix.mix_backward(grad_out, ys, w, True)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))


def test_mix_relu_keeps_a_nan_sum():
    """As torch.relu (the reference): a NaN sum stays NaN; only sums below 0 become 0."""
    y = torch.tensor([[float("nan"), -1.0, 2.0, 0.5]])
    w = torch.tensor([[1.0]])
    out = triton_mix.mix([y], w, relu=True)
    expected = reference.mix([y], w, relu=True)
    assert torch.equal(out.isnan(), expected.isnan()) and out[0, 0].isnan()
    assert torch.equal(out[:, 1:], expected[:, 1:])



def _y(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def _bad(call, pattern, error=ValueError):
    """A case: ``call`` must raise ``error`` matching ``pattern`` ("^op: argument ..."); id "op-argument"."""
    op, message = pattern[1:].split(": ", 1)
    return pytest.param(call, error, pattern, id=f"{op}-{message.split()[0].replace(chr(92), '')}")


# Valid arguments: B = 2, rest = (3,), K = 2; _IDX lists both examples for each candidate.
_W, _G, _IDX = torch.ones(2, 2), torch.ones(2, 3), [torch.tensor([0, 1]), torch.tensor([1, 0])]
_YS = [_y(2, 3), _y(2, 3)]


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        _bad(lambda: triton_mix.mix([_y(2, 3), _y(1, 3)], _W),
             r"^mix: ys\[1\] has batch 1 but weights has B = 2"),
        _bad(lambda: triton_mix.mix(_YS, torch.ones(2, 3)),
             r"^mix: weights has K = 3 columns but ys holds 2 candidates"),
        _bad(lambda: triton_mix.mix([_y(2, 3), _y(2, 4)], _W, relu=True),
             r"^mix_relu: ys\[1\] has shape \(2, 4\), which disagrees with ys\[0\]"),
        _bad(lambda: triton_mix.mix([_y(2, 3), _y(2, 3, dtype=torch.float64)], _W),
             r"^mix: ys\[1\] has dtype torch.float64 but weights has dtype torch.float32"),
        _bad(lambda: triton_mix.mix([_y(2, 3)], torch.ones(2)), r"^mix: weights must be \[B, K\]"),
        _bad(lambda: triton_mix.mix([], torch.ones(2, 0)), r"^mix: ys must hold at least one candidate"),
        _bad(lambda: triton_mix.mix([_y(2, 3)], torch.ones(2, 1, dtype=torch.int64)),
             r"^mix: weights must be a float16, bfloat16, float32 or float64 tensor", TypeError),
        _bad(lambda: triton_mix.mix_backward(_y(3, 3), _YS, _W, True),
             r"^mix_backward: grad_out has shape \(3, 3\)"),
        _bad(lambda: triton_mix.mix_backward(_G, [_y(2, 3), _y(1, 3)], _W, True),
             r"^mix_backward: ys\[1\] has batch 1"),
        _bad(lambda: triton_mix.mix_backward(_G.double(), _YS, _W, True),
             r"^mix_backward: grad_out has dtype torch.float64"),
        _bad(lambda: triton_mix.mix_backward(_G, _YS, _W, True, _y(2, 2)),
             r"^mix_backward: relu_out must have grad_out's shape \(2, 3\)"),
        _bad(lambda: triton_mix.mix_sparse(_YS, [_IDX[0], _IDX[1][:1]], _W),
             r"^mix_sparse: indices\[1\] has 1 entries but ys\[1\] has 2 rows"),
        _bad(lambda: triton_mix.mix_sparse(_YS, _IDX[:1], _W),
             r"^mix_sparse: indices holds 1 tensors but there are K = 2 candidates"),
        _bad(lambda: triton_mix.mix_sparse(_YS, [_IDX[0].int(), _IDX[1]], _W),
             r"^mix_sparse: indices\[0\] must be a 1-D int64 tensor"),
        _bad(lambda: triton_mix.mix_sparse([_y(2, 3), _y(2, 4)], _IDX, _W),
             r"^mix_sparse: ys\[1\] has shape \(2, 4\)"),
        _bad(lambda: triton_mix.mix_sparse_backward(_y(1, 3), _YS, _IDX, _W, True),
             r"^mix_sparse_backward: grad_out has shape \(1, 3\)"),
        _bad(lambda: triton_mix.mix_sparse_backward(_G, [_y(2, 3), _y(1, 3)], _IDX, _W, True),
             r"^mix_sparse_backward: indices\[1\] has 2 entries but ys\[1\] has 1 rows"),
    ],
)
def test_bad_arguments_are_caught_before_launch(call, error, pattern):
    """A direct op call on CUDA reaches the launchers unchecked: they repeat the C++ kernel's checks
    (a candidate with too few rows, or a grad_out of the wrong shape, would be read out of bounds)."""
    with pytest.raises(error, match=pattern):
        call()
