"""Test ladder for gumbel_sigmoid_dropout (concrete dropout with learnable drop rates, seed 001):

1. the reference: Philox against Random123's known answer, the logistic noise at the ends of the
   word range, the explicit backward against autograd of the reference forward, the statistics of
   the masks (keep rate 1 - p; soft -> hard as the temperature falls);
2. the registered op (C++ on CPU) against the reference, forward and both gradients, over dtypes,
   shapes, granularities, modes and rescaling; the same masks bit for bit in hard mode;
3. float64 gradcheck, torch.library.opcheck, torch.compile(fullgraph=True);
4. reproducibility (seed_offset, torch.manual_seed, thread counts) and extreme probabilities;
5. the module, the input-channel convolution and the eq. 15 regulariser against a brute-force sum;
6. bad input.
"""

import math

import pytest
import torch
from torch import nn

import bnas_fast
from bnas_fast import reference
from bnas_fast.nn import GumbelSigmoidDropout, InputDropoutConv2d, concrete_dropout_regularizer

from _threads import num_threads
from _tolerance import assert_within

# The noise L is float32 on every backend, from the same Philox words, but the kernel's log is a
# polynomial (a few float32 ulp, ~1e-6 absolute on |L| <= 23) where the reference calls torch.log;
# divided by the temperature (0.3) that moves keep by ~1e-5 relative. float64 computes in float64
# after the noise, so it shares float32's tolerance; its gradcheck below is exact. bfloat16/float16
# outputs are rounded once from float32.
TOLERANCES = {
    torch.float64: {"rtol": 2e-5, "atol": 2e-5},
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
}
# The gradient to a logit is a sum over B * P * group_size terms; its tolerance is relative to the
# sum of their magnitudes.
DTYPES = list(TOLERANCES)

# (x shape [B, C, P], group_size, per_element)
CASES = [
    ((1, 1, 1), 1, True),
    ((3, 6, 5), 1, True),
    ((3, 6, 5), 2, True),
    ((7, 6, 33), 1, False),
    ((7, 6, 33), 3, False),
    ((7, 6, 1), 2, False),
    ((2, 3, 1500), 1, True),  # rows longer than a block of 1024 units
]
SEED_OFFSET = torch.tensor([2**40 + 12345, 2**32 - 3])  # a seed above 2^32; counters cross 2^32


def _inputs(shape, group_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    drop_logit = (torch.randn(shape[1] // group_size, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, drop_logit, grad_y


# ---------------------------------------------------------------------------------------------
# 1. The reference
# ---------------------------------------------------------------------------------------------
def test_philox_matches_random123_known_answers():
    # Random123's kat_vectors for philox4x32_10: counter 0 under key 0
    assert [hex(v) for v in reference.philox_bits(0, 0, 4).tolist()] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]
    assert reference.philox_bits(0, 0, 0).numel() == 0
    # the counter's high word: offsets 2^32 - 1 and 2^32 differ only there
    a, b = reference.philox_bits(7, 2**32 - 1, 4), reference.philox_bits(7, 2**32, 4)
    assert not torch.equal(a, b) and int(a.max()) < 2**32 and int(a.min()) >= 0


def test_logistic_noise_is_finite_at_the_ends_of_the_word_range():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    noise = reference.logistic_noise(words)
    assert torch.isfinite(noise).all()
    assert noise[0] == -noise[-1] and abs(float(noise[0]) + math.log(2**33)) < 1e-3
    assert abs(float(noise[2])) < 1e-6 and abs(float(noise[3])) < 1e-6


def test_kernel_noise_matches_the_reference_at_the_ends_of_the_word_range():
    words = torch.tensor([0, 1, 2, 2**16, 2**31 - 1, 2**31, 2**32 - 3, 2**32 - 2, 2**32 - 1])
    words = torch.cat([words, reference.philox_bits(5, 0, 10_000)])
    got = torch.ops.bnas_fast.logistic_noise_of_words(words)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference.logistic_noise(words), rtol=1e-6, atol=2e-6)
    torch.library.opcheck(torch.ops.bnas_fast.logistic_noise_of_words.default, (words[:100],))


def test_backward_keeps_nothing_of_the_noise():
    """Saved for backward: x (for the logit's gradient), the logits and the two-integer seed."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(8, 16, 32, requires_grad=True)
    drop_logit = torch.zeros(16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, granularity="element")
    assert sum(saved) <= x.numel() * 4 + 16 * 4 + 2 * 8, saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bnas_fast.gumbel_sigmoid_dropout(x, drop_logit.detach(), granularity="element")
    assert sum(saved) <= 16 * 4 + 2 * 8, saved  # no gradient to the logits: x is not kept either
    y.sum().backward()


def test_logistic_noise_has_the_logistic_distribution():
    noise = reference.logistic_noise(reference.philox_bits(3, 0, 200_000)).double()
    # mean 0, variance pi^2 / 3; P(L < 1) = sigmoid(1)
    assert abs(float(noise.mean())) < 0.02
    assert abs(float(noise.var()) - math.pi**2 / 3) < 0.05
    assert abs(float((noise < 1).double().mean()) - 1 / (1 + math.exp(-1))) < 0.004


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("case", CASES[:6])
def test_reference_backward_matches_autograd_of_reference_forward(case, rescale, mode):
    shape, group_size, per_element = case
    x, drop_logit, grad_y = _inputs(shape, group_size, torch.float64)
    x.requires_grad_(), drop_logit.requires_grad_()
    args = (SEED_OFFSET, 0.3, group_size, per_element, rescale, mode)
    y = reference.gumbel_sigmoid_dropout(x, drop_logit, *args)
    gx, gl = torch.autograd.grad(y, (x, drop_logit), grad_y, allow_unused=True)
    ex, el = reference.gumbel_sigmoid_dropout_backward(grad_y, x.detach(), drop_logit.detach(), *args)
    torch.testing.assert_close(ex, gx)
    torch.testing.assert_close(el, torch.zeros_like(el) if gl is None else gl)


def test_hard_masks_keep_with_probability_one_minus_p():
    x = torch.ones(400, 5, 50)
    drop_logit = torch.logit(torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95]))
    y = torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, SEED_OFFSET, 0.2, 1, True, False, 2)
    rate = y.mean((0, 2))
    n = 400 * 50
    expected = 1 - torch.sigmoid(drop_logit)
    # 5 standard errors of a binomial proportion
    assert ((rate - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt()).all(), (rate, expected)


def test_soft_sample_approaches_the_hard_one_as_temperature_falls():
    x = torch.ones(64, 8, 16)
    drop_logit = torch.zeros(8)
    hard = torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, SEED_OFFSET, 1.0, 1, True, False, 2)
    gaps = []
    for tau in (1.0, 0.1, 0.01):
        soft = torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, SEED_OFFSET, tau, 1, True, False, 0)
        gaps.append(float((soft - hard).abs().mean()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01, gaps


# ---------------------------------------------------------------------------------------------
# 2. The op against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_reference(dtype, case, rescale, mode):
    shape, group_size, per_element = case
    x, drop_logit, grad_y = _inputs(shape, group_size, dtype)
    args = (SEED_OFFSET, 0.3, group_size, per_element, rescale, mode)
    tol = TOLERANCES[dtype]
    y = torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, *args)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within(y, reference.gumbel_sigmoid_dropout(x, drop_logit, *args), tol, "y")
    gx, gl = torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    rx, rl = reference.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    assert_within(gx, rx, tol, "grad_x")
    # the logit's gradient sums many terms: compare against the sum of their magnitudes
    magnitude = reference.gumbel_sigmoid_dropout_backward(grad_y.abs(), x.abs(), drop_logit, *args)[1].double().abs()
    assert ((gl.double() - rl.double()).abs() <= tol["atol"] + tol["rtol"] * (magnitude + 1)).all(), (gl, rl)


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("P", [4096, 4100])  # rows 64-byte aligned (all streamed) or not (a mix)
def test_outputs_of_16_mib_and_more_take_the_streaming_stores(P, per_element):
    """Outputs of kStreamingBytes (16 MiB, csrc/common.h) and more are written with non-temporal
    stores where the destination is aligned: the same values as the reference, forward and backward."""
    x, drop_logit, grad_y = _inputs((16, 64, P), 1, torch.float32)
    assert x.nbytes >= 16 << 20
    args = (SEED_OFFSET, 0.3, 1, per_element, True, 0)
    tol = TOLERANCES[torch.float32]
    assert_within(torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, *args),
                  reference.gumbel_sigmoid_dropout(x, drop_logit, *args), tol, "y")
    gx, gl = torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    rx, rl = reference.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    assert_within(gx, rx, tol, "grad_x")
    magnitude = reference.gumbel_sigmoid_dropout_backward(grad_y.abs(), x.abs(), drop_logit, *args)[1].double().abs()
    assert ((gl.double() - rl.double()).abs() <= tol["atol"] + tol["rtol"] * (magnitude + 1)).all(), (gl, rl)


@pytest.mark.parametrize("case", CASES)
def test_hard_masks_equal_the_reference_bit_for_bit(case):
    shape, group_size, per_element = case
    x = torch.ones(shape)
    drop_logit = _inputs(shape, group_size, torch.float32)[1]
    args = (SEED_OFFSET, 0.3, group_size, per_element, False, 2)
    assert torch.equal(
        torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, *args), reference.gumbel_sigmoid_dropout(x, drop_logit, *args)
    )


@pytest.mark.parametrize("granularity", ["element", "channel", "group"])
def test_public_function_matches_reference_on_image_shapes(granularity):
    x = torch.randn(5, 6, 4, 3)
    drop_logit = torch.randn(3 if granularity == "group" else 6)
    kw = dict(group_size=2) if granularity == "group" else {}
    y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, 0.2, granularity=granularity, seed_offset=SEED_OFFSET, **kw)
    expected = reference.gumbel_sigmoid_dropout(x.reshape(5, 6, 12), drop_logit, SEED_OFFSET, 0.2, 2 if granularity == "group" else 1, granularity == "element", True, 0)
    assert_within(y, expected.reshape(x.shape), TOLERANCES[torch.float32], granularity)
    if granularity != "element":  # one mask per (example, channel): constant over the feature map
        ratio = y / x
        assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), rtol=1e-5, atol=1e-6)


def test_shared_logit_broadcasts_and_sums_its_gradient():
    x = torch.randn(4, 6, 7)
    shared = torch.tensor([0.3], requires_grad=True)
    full = shared.detach().expand(6).clone().requires_grad_()
    y1 = bnas_fast.gumbel_sigmoid_dropout(x, shared, 0.5, seed_offset=SEED_OFFSET)
    y2 = bnas_fast.gumbel_sigmoid_dropout(x, full, 0.5, seed_offset=SEED_OFFSET)
    torch.testing.assert_close(y1, y2)
    y1.sum().backward(), y2.sum().backward()
    torch.testing.assert_close(shared.grad, full.grad.sum(0, keepdim=True))


def test_eval_mode_is_the_expectation():
    x = torch.randn(4, 3, 5)
    drop_logit = torch.tensor([-1.0, 0.0, 2.0])
    p = torch.sigmoid(drop_logit)[None, :, None]
    torch.testing.assert_close(bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, training=False), x)
    torch.testing.assert_close(bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, training=False, rescale=False), x * (1 - p))


def test_no_gradient_to_the_logit_does_not_keep_x():
    x = torch.randn(3, 4, 5, requires_grad=True)
    drop_logit = torch.zeros(4)
    y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, seed_offset=SEED_OFFSET)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = reference.gumbel_sigmoid_dropout_backward(torch.ones_like(y), x.detach(), drop_logit, SEED_OFFSET, 0.2, 1, True, True, 0)[0]
    torch.testing.assert_close(gx, expected)


# ---------------------------------------------------------------------------------------------
# 3. gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("granularity", ["element", "channel", "group"])
def test_gradcheck_float64(granularity, rescale, mode):
    # Straight-through is not the derivative of its forward by design (the hard sample's derivative
    # is 0 almost everywhere); its backward is checked against the reference's formula above.
    x, drop_logit, _ = _inputs((3, 4, 5), 2 if granularity == "group" else 1, torch.float64)
    kw = dict(group_size=2) if granularity == "group" else {}

    def f(x, drop_logit):
        return bnas_fast.gumbel_sigmoid_dropout(
            x, drop_logit, 0.7, granularity=granularity, rescale=rescale, mode=mode, seed_offset=SEED_OFFSET, **kw
        )

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), drop_logit.requires_grad_()))


@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(case, mode):
    shape, group_size, per_element = case
    x, drop_logit, _ = _inputs(shape, group_size, torch.float32)
    args = (x.requires_grad_(), drop_logit.requires_grad_(), SEED_OFFSET, 0.3, group_size, per_element, True, mode)
    torch.library.opcheck(torch.ops.bnas_fast.gumbel_sigmoid_dropout.default, args)
    grad_y = torch.randn(shape)
    torch.library.opcheck(
        torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward.default,
        (grad_y, x.detach(), drop_logit.detach(), SEED_OFFSET, 0.3, group_size, per_element, True, mode),
    )


class _TinyPGNAS(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = InputDropoutConv2d(nn.Conv2d(4, 4, 3, padding=1), init_drop=0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    """Same seed_offset in both: the compiled graph runs the same op, so the same masks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled_model = _TinyPGNAS(), _TinyPGNAS()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(6, 2, 5, 5)
    for model in (eager, compiled):
        torch.manual_seed(7)  # the seed_offset is drawn from the global generator
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [p for p in (eager if model is eager else compiled_model).parameters()])
        if model is eager:
            out_e, grads_e = out, grads
    torch.testing.assert_close(out, out_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    eager.eval(), compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Reproducibility and extremes
# ---------------------------------------------------------------------------------------------
def test_manual_seed_reproduces_the_masks_and_new_calls_draw_new_ones():
    x = torch.ones(4, 8, 16)
    drop_logit = torch.zeros(8)
    torch.manual_seed(3)
    a, b = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit), bnas_fast.gumbel_sigmoid_dropout(x, drop_logit)
    torch.manual_seed(3)
    c = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit)
    assert torch.equal(a, c) and not torch.equal(a, b)
    gen = torch.Generator().manual_seed(3)
    d = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, generator=gen)
    gen.manual_seed(3)
    assert torch.equal(d, bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, generator=gen))


@pytest.mark.parametrize("per_element", [True, False])
def test_deterministic_across_thread_counts(per_element):
    x, drop_logit, grad_y = _inputs((64, 16, 300), 1, torch.float32)
    args = (SEED_OFFSET, 0.2, 1, per_element, True, 0)

    def run():
        y = torch.ops.bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, *args)
        return (y,) + torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)

    first = run()
    for threads in (1, 2):
        with num_threads(threads):
            for a, b in zip(first, run()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [1e-7, 1 - 1e-7])
@pytest.mark.parametrize("temperature", [1e-3, 0.2, 10.0])
def test_extreme_probabilities_give_finite_outputs_and_gradients(p, temperature, dtype):
    x = torch.randn(8, 4, 50, dtype=dtype, requires_grad=True)
    drop_logit = torch.full((4,), math.log(p) - math.log1p(-p), dtype=dtype, requires_grad=True)
    for mode in ("soft", "straight_through", "hard"):
        y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, temperature, mode=mode, seed_offset=SEED_OFFSET)
        gx, gl = torch.autograd.grad(y.sum(), (x, drop_logit))
        assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gl).all()


@pytest.mark.parametrize("temperature", [0.2, 1.0])
@pytest.mark.parametrize("drop_logit_value", [80.0, 87.5])
def test_soft_mode_near_the_rescale_limit_matches_the_reference(drop_logit_value, temperature):
    """With a drop logit near the float32 limit of the rescale (87.7), soft keep underflows while
    keep * (1 + e^lambda) is of order 1 (temperature 1) or about 0 (0.2). exp clamped at 88 once gave
    dropped units e^(lambda - 88): y = 0.6 where the reference has 1e-139."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 64, generator=gen)
    grad_y = torch.randn(4, 2, 64, generator=gen)
    drop_logit = torch.full((2,), drop_logit_value, requires_grad=True)
    y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, temperature, mode="soft", seed_offset=SEED_OFFSET)
    y.backward(grad_y)
    logit64 = torch.full((2,), drop_logit_value, dtype=torch.float64, requires_grad=True)
    y64 = reference.gumbel_sigmoid_dropout(x.double(), logit64, SEED_OFFSET, temperature, 1, True, True, 0)
    y64.backward(grad_y.double())
    scale = max(float(y64.abs().max()), 1.0)
    assert float((y.double() - y64).abs().max()) < 1e-5 * scale
    # grad_lambda is a cancellation of terms of the size of y: float32 leaves ~1e-7 of them
    assert float((drop_logit.grad.double() - logit64.grad).abs().max()) < 1e-5 * scale


@pytest.mark.parametrize("shape,per_element", [((4_000_000, 1, 1), False), ((4_000_000, 1, 1), True),
                                               ((1, 1, 4_000_000), True)])
def test_grad_lambda_over_millions_of_units_keeps_float32_accuracy(shape, per_element):
    """grad_lambda sums over every unit: sequentially in float32, 4e6 units were 2.5% off."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen)
    grad_y = 1.0 + torch.randn(shape, generator=gen)
    args = (SEED_OFFSET, 0.5, 1, per_element, True, 2)  # hard mode
    drop_logit = torch.tensor([0.3])
    _, got = torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, *args)
    _, expected = reference.gumbel_sigmoid_dropout_backward(grad_y.double(), x.double(), drop_logit.double(), *args)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# 5. Module, convolution, regulariser
# ---------------------------------------------------------------------------------------------
def test_module_drop_rate_and_modes():
    drop = GumbelSigmoidDropout(6, init_drop=0.25)
    torch.testing.assert_close(drop.drop_rate, torch.full((6,), 0.25))
    x = torch.randn(3, 6, 4, 4)
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    expected = bnas_fast.gumbel_sigmoid_dropout(x, drop.drop_logit, 0.2, granularity="channel")
    torch.testing.assert_close(y, expected)
    drop.eval()
    torch.testing.assert_close(drop(x), x)  # rescaled expectation


def test_sample_keep_and_fixed_keep():
    drop = GumbelSigmoidDropout(1, init_drop=0.3, rescale=False)  # one rate shared by 4000 channels
    keep = drop.sample_keep(4000, torch.Generator().manual_seed(0))
    assert keep.shape == (4000,) and abs(float(keep.mean()) - 0.7) < 0.03
    assert abs(float(drop.sample_keep(4000, drop_rate=0.9).mean()) - 0.1) < 0.03
    small = GumbelSigmoidDropout(3, init_drop=0.5, rescale=True)
    small.fixed_keep = torch.tensor([1.0, 0.0, 1.0])
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(small(x), x * torch.tensor([2.0, 0.0, 2.0])[None, :, None])
    grouped = GumbelSigmoidDropout(2, granularity="group", group_size=2, rescale=False)
    grouped.fixed_keep = torch.tensor([0.0, 1.0])
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(grouped(x), x * torch.tensor([0.0, 0.0, 1.0, 1.0])[None, :, None])
    with pytest.raises(ValueError, match=r"fixed_keep must be \[2\] for an input of 4 channels"):
        grouped.fixed_keep = torch.ones(4)
        grouped(x)
    for bad in ([0.5, 1.0], [float("nan"), 1.0], [3.0, 0.0]):
        grouped.fixed_keep = torch.tensor(bad)
        with pytest.raises(ValueError, match="fixed_keep must hold only 0 and 1"):
            grouped(x)
    for rate in (float("nan"), 5.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="drop_rate must be a number in"):
            drop.sample_keep(10, drop_rate=rate)
    for channels in (-1, 2.5, True):
        with pytest.raises(ValueError, match="channels must be an int"):
            drop.sample_keep(channels)


def _brute_force_regularizer(weight, p, length_scale, num_data, unit_size, rescale, conv_groups):
    """eq. 15 summed unit by unit, weight by weight, with Python floats."""
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    in_channels = in_per_group * conv_groups
    total = 0.0
    for u in range(in_channels // unit_size):
        pu = float(p[u] if p.numel() > 1 else p[0])
        sq = 0.0
        for c in range(u * unit_size, (u + 1) * unit_size):
            group, local = divmod(c, in_per_group)
            for o in range(group * (out_channels // conv_groups), (group + 1) * (out_channels // conv_groups)):
                sq += float(weight[o, local].double().square().sum())
        factor = 1 / (1 - pu) if rescale else 1 - pu
        entropy = -(pu * math.log(pu) + (1 - pu) * math.log(1 - pu))
        total += length_scale**2 * factor * sq / 2 - entropy
    return total / num_data


@pytest.mark.parametrize(
    "weight_shape, conv_groups, unit_size, shared",
    [((5, 6), 1, 1, False), ((8, 6, 3, 3), 1, 1, False), ((8, 6, 3, 3), 1, 3, False), ((8, 3, 3, 3), 2, 1, False), ((8, 6, 1, 1), 1, 1, True)],
)
@pytest.mark.parametrize("rescale", [True, False])
def test_regularizer_matches_brute_force(weight_shape, conv_groups, unit_size, shared, rescale):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(weight_shape, generator=gen, dtype=torch.float64)
    in_channels = weight_shape[1] * conv_groups
    units = 1 if shared else in_channels // unit_size
    drop_logit = torch.randn(units, generator=gen, dtype=torch.float64)
    got = concrete_dropout_regularizer(weight, drop_logit, 0.3, 1000, unit_size=unit_size, rescale=rescale, conv_groups=conv_groups)
    expected = _brute_force_regularizer(weight, torch.sigmoid(drop_logit), 0.3, 1000, unit_size, rescale, conv_groups)
    assert abs(float(got) - expected) <= 1e-12 * max(1.0, abs(expected))


def test_input_dropout_conv_regularizer_counts_each_input_channel_once():
    """Not once per spatial position: the regulariser does not depend on the input's size."""
    layer = InputDropoutConv2d(nn.Conv2d(4, 6, 3), init_drop=0.2)
    r = layer.regularizer(1e-2, 100)
    expected = _brute_force_regularizer(layer.conv.weight.detach(), layer.dropout.drop_rate.detach(), 1e-2, 100, 1, False, 1)
    assert abs(float(r.detach()) - expected) < 1e-6 * max(1.0, abs(expected))
    r.backward()
    assert layer.dropout.drop_logit.grad is not None and layer.conv.weight.grad is not None
    assert layer.conv.bias.grad is None  # biases are not gated by the input mask
    assert layer(torch.randn(2, 4, 7, 7)).shape == (2, 6, 5, 5)


# ---------------------------------------------------------------------------------------------
# 6. Bad input
# ---------------------------------------------------------------------------------------------
def _call(x=None, drop_logit=None, temperature=0.2, **kw):
    x = torch.randn(2, 4, 3) if x is None else x
    drop_logit = torch.zeros(4) if drop_logit is None else drop_logit
    return bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, temperature, **kw)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(drop_logit=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, r"drop_logit holds NaN.*\(0, 1\)"),
        (dict(drop_logit=torch.tensor([float("inf")] * 4)), ValueError, r"drop_logit holds NaN or infinity"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number"),
        (dict(temperature=-1.0), ValueError, r"temperature must be a finite number"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number"),
        (dict(temperature="hot"), TypeError, r"temperature must be a float"),
        (dict(temperature=1e-39), ValueError, r"temperature must be a finite number >= 1e-30"),  # 1 / t overflows float32
        (dict(drop_logit=torch.zeros(3)), ValueError, r"drop_logit must have shape \[4\] \(one logit per C = 4 channels\)"),
        (dict(drop_logit=torch.zeros(4), granularity="group", group_size=2), ValueError, r"drop_logit must have shape \[2\].*groups"),
        (dict(granularity="group", group_size=3), ValueError, r"group_size = 3 does not divide the C = 4 channels"),
        (dict(granularity="group"), ValueError, r"needs group_size"),
        (dict(group_size=2), ValueError, r"group_size is for granularity 'group' only"),
        (dict(granularity="pixel"), ValueError, r"granularity must be one of"),
        (dict(mode="bernoulli"), ValueError, r"mode must be one of"),
        (dict(x=torch.randn(5)), ValueError, r"x must have shape \[B, C, \*\]"),
        (dict(x=torch.randint(0, 3, (2, 4, 3))), TypeError, r"x must be a floating-point tensor"),
        (dict(drop_logit=torch.zeros(4, dtype=torch.float64)), TypeError, r"drop_logit has dtype torch.float64 but x has dtype torch.float32"),
        (dict(drop_logit=[0.0] * 4), TypeError, r"drop_logit must be a torch.Tensor"),
        (dict(seed_offset=torch.tensor([1, 2, 3])), TypeError, r"seed_offset must be a CPU int64 tensor of shape \[2\]"),
        (dict(seed_offset=torch.tensor([1.0, 2.0])), TypeError, r"seed_offset must be a CPU int64 tensor"),
        (dict(seed_offset=torch.tensor([-1, 2])), ValueError, r"seed_offset must be non-negative"),
        (dict(drop_logit=torch.full((4,), 90.0)), ValueError, r"drop_logit holds 90: with rescale, 1 / \(1 - p\).*overflows"),
        (dict(generator=123), TypeError, r"gumbel_sigmoid_dropout: generator must be None or a torch.Generator, got int"),
        (dict(generator=123, training=False), TypeError, r"generator must be None or a torch.Generator"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kwargs)


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((torch.randn(2, 4), torch.zeros(4)), r"x must be \[B, C, P\]"),
        ((torch.randn(2, 4, 3), torch.zeros(3)), r"drop_logit must be \[C / group_size\]"),
    ],
)
def test_direct_op_calls_are_checked_in_cpp(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        torch.ops.bnas_fast.gumbel_sigmoid_dropout(*args, SEED_OFFSET, 0.2, 1, True, True, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        torch.ops.bnas_fast.gumbel_sigmoid_dropout(torch.randn(2, 4, 3), torch.zeros(4), SEED_OFFSET, 0.0, 1, True, True, 0)
    with pytest.raises(ValueError, match="group_size = 3 must be >= 1 and divide C = 4"):
        torch.ops.bnas_fast.gumbel_sigmoid_dropout(torch.randn(2, 4, 3), torch.zeros(1), SEED_OFFSET, 0.2, 3, False, True, 0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(init_drop=0.0), r"init_drop must be a drop probability in \(0, 1\)"),
        (dict(init_drop=1.0), r"init_drop must be a drop probability in \(0, 1\)"),
        (dict(init_drop=float("nan")), r"init_drop must be a drop probability in \(0, 1\)"),
        (dict(temperature=0), r"temperature must be a finite number"),
        (dict(granularity="x"), r"granularity must be one of"),
        (dict(mode="x"), r"mode must be one of"),
        (dict(shape=0), r"shape must give at least one drop rate"),
        (dict(granularity="group"), r"granularity 'group' needs group_size, a positive int, got None"),
    ],
)
def test_module_bad_arguments(kwargs, pattern):
    kwargs = dict(dict(shape=4), **kwargs)
    with pytest.raises(ValueError, match=pattern):
        GumbelSigmoidDropout(**kwargs)


def test_draw_seed_offset_bad_generator():
    from bnas_fast.ops.gumbel_sigmoid_dropout import draw_seed_offset

    with pytest.raises(TypeError, match=r"draw_seed_offset: generator must be None or a torch.Generator, got int"):
        draw_seed_offset(123)


def test_regularizer_bad_arguments():
    w = torch.randn(4, 6, 3, 3)
    with pytest.raises(ValueError, match=r"drop_logit must be \[6\] \(one per unit\) or \[1\]"):
        concrete_dropout_regularizer(w, torch.zeros(5), 0.1, 10)
    with pytest.raises(ValueError, match=r"unit_size = 4 does not divide the 6 input channels"):
        concrete_dropout_regularizer(w, torch.zeros(1), 0.1, 10, unit_size=4)
    with pytest.raises(ValueError, match=r"num_data must be a positive int"):
        concrete_dropout_regularizer(w, torch.zeros(6), 0.1, 0)
    with pytest.raises(ValueError, match=r"group_size = 4 must divide in_channels = 6"):
        InputDropoutConv2d(nn.Conv2d(6, 2, 1), granularity="group", group_size=4)
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv2d"):
        InputDropoutConv2d(nn.Linear(6, 2))
    for key, value in (("conv_groups", 0), ("conv_groups", 2.0), ("unit_size", 2.0), ("unit_size", True), ("unit_size", 0)):
        with pytest.raises(ValueError, match=rf"concrete_dropout_regularizer: {key} must be a positive int, got {value!r}"):
            concrete_dropout_regularizer(w, torch.zeros(1), 0.1, 10, **{key: value})
    for bad in (float("nan"), float("inf")):  # would give a NaN regulariser
        with pytest.raises(ValueError, match=r"concrete_dropout_regularizer: drop_logit contains a non-finite value .* index \[2\]"):
            concrete_dropout_regularizer(w, torch.tensor([0.0, 0.0, bad, 0.0, 0.0, 0.0]), 0.1, 10)
    with pytest.raises(TypeError, match=r"concrete_dropout_regularizer: drop_logit must be a torch.Tensor"):
        concrete_dropout_regularizer(w, [0.0] * 6, 0.1, 10)


def test_fixed_keep_with_a_group_size_not_dividing_the_channels():
    drop = GumbelSigmoidDropout(1, granularity="group", group_size=2)
    drop.fixed_keep = torch.ones(1)
    assert drop(torch.ones(2, 2, 3)).shape == (2, 2, 3)
    for channels in (3, 5):  # 3 // 2 = 1 unit would pass the fixed_keep shape check
        with pytest.raises(ValueError, match=rf"GumbelSigmoidDropout: group_size = 2 does not divide the C = {channels} channels"):
            drop(torch.ones(2, channels, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_mode_in_low_precision_does_not_overflow_the_rescale(dtype):
    """drop_logit = 12 (p = 0.999994) is valid; 1 + exp(12) overflows float16, so the expectation
    keep * scale = 1 must be worked out in float32."""
    x = torch.ones(2, 3, 4, dtype=dtype)
    drop_logit = torch.full((3,), 12.0, dtype=dtype)
    y = bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, training=False)
    torch.testing.assert_close(y, x, rtol=1e-2, atol=0)


def test_fixed_keep_is_saved_loaded_and_moved_with_the_module():
    """A sampled architecture (fixed_keep) survives state_dict round trips and dtype moves; a state
    without one clears it."""
    drop = GumbelSigmoidDropout(4, init_drop=0.3, rescale=True)
    drop.fixed_keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    x = torch.randn(2, 4, 3)
    fresh = GumbelSigmoidDropout(4, init_drop=0.3, rescale=True)
    fresh.load_state_dict(drop.state_dict())
    assert torch.equal(fresh.fixed_keep, drop.fixed_keep)
    torch.testing.assert_close(fresh(x), drop(x))
    assert drop.double().fixed_keep.dtype == torch.float64
    fresh.load_state_dict(GumbelSigmoidDropout(4).state_dict())  # saved without a fixed mask
    assert fresh.fixed_keep is None and "fixed_keep" not in fresh.state_dict()
