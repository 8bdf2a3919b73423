"""Tests of the reference GGN blocks :func:`bnas_fast.reference.unfolded_gram` and the softmax
cross-entropy factors :func:`bnas_fast.reference.softmax_ce_hessian_factors`.

The oracle is brute force in float64, independent of the factor decomposition: for one layer of a
tiny torch.nn network, the per-example Jacobian J_n [C, P] of the logits wrt all of that layer's
parameters (torch.func: vmap of jacrev), the softmax cross-entropy Hessian H_n = diag(p_n) - p_n p_n^T
of the SUMMED loss, the full GGN sum_n J_n^T H_n J_n [P, P], and for each output channel o its
diagonal block on (W[o].flatten(), b[o]). The reference gets the layer's input and the exact factors
back-propagated from the logits to the layer's output with torch.autograd.grad, one pass per k.

Rungs:
 1. exact blocks against brute force (float64, relative 1e-8) over a ladder of layers: stride 2,
    padding 0/1/2, dilation 2, groups 2, depthwise, 1x1 / 3x3 / 1x3 / 3x1 kernels, with and without
    bias, Linear layers (first layer, hidden, head), N = 1 and 3, odd spatial sizes, first and
    deeper layers;
 2. the exact factors reproduce diag(p) - p p^T; the Monte-Carlo factors are unbiased (the mean of
    K = 1 blocks converges to the exact blocks at the rate predicted by their exact variance);
 3. bfloat16 / float16 inputs: float32 result close to the float64 one.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from _tolerance import assert_within
from bnas_fast import reference

CLASSES = 5

# ---------------------------------------------------------------------------------------------
# The ladder of layers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """Conv2d arguments, spelled out as (int, int) tuples like unfolded_gram takes them."""

    c_in: int
    c_out: int
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def module(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.c_in, self.c_out, self.kernel, self.stride, self.padding, self.dilation, self.groups,
            self.bias,
        )


@dataclass(frozen=True)
class Case:
    """A tiny network and the layer whose GGN blocks are checked.

    net: "single" = conv -> tanh -> flatten -> linear (every output position reaches the logits
         through its own weights); "deep" = conv1 -> relu -> conv2 -> relu -> global mean pool ->
         linear; "mlp" = linear -> tanh -> linear -> tanh -> linear (no convolution).
    target: the index of the layer in the nn.Sequential.
    """

    name: str
    net: str
    n: int
    hw: Tuple[int, int] = (0, 0)
    conv1: Optional[Conv] = None
    conv2: Optional[Conv] = None
    widths: Tuple[int, ...] = ()
    biases: Tuple[bool, ...] = ()
    target: int = 0

    def __str__(self) -> str:
        return self.name


CASES = (
    Case("3x3_p1_bias_deep_first_n3", "deep", 3, (7, 7), Conv(3, 4), Conv(4, 3), target=0),
    Case(
        "3x3_p0_nobias_deep_second_n3",
        "deep", 3, (7, 9), Conv(3, 4), Conv(4, 5, padding=(0, 0), bias=False), target=2,
    ),
    Case(
        "3x3_stride2_p0_nobias_n1",
        "single", 1, (9, 9), Conv(3, 4, stride=(2, 2), padding=(0, 0), bias=False),
    ),
    Case("3x3_stride2_p1_bias_n3", "single", 3, (7, 5), Conv(2, 3, stride=(2, 2))),
    Case("3x3_dilation2_p1_bias_n3", "single", 3, (9, 7), Conv(3, 4, dilation=(2, 2))),
    Case("3x3_groups2_p1_bias_n3", "single", 3, (5, 5), Conv(4, 6, groups=2)),
    Case(
        "3x3_groups2_stride2_dilation2_p2_nobias_n1",
        "single", 1, (9, 7), Conv(4, 2, stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=2, bias=False),
    ),
    Case("3x3_depthwise_bias_n3", "single", 3, (5, 7), Conv(3, 3, groups=3)),
    Case(
        "3x3_depthwise_stride2_nobias_deep_first_n1",
        "deep", 1, (7, 7), Conv(4, 4, stride=(2, 2), groups=4, bias=False), Conv(4, 3), target=0,
    ),
    Case("1x1_bias_n3", "single", 3, (5, 5), Conv(3, 5, kernel=(1, 1), padding=(0, 0))),
    Case(
        "1x1_stride2_nobias_n1",
        "single", 1, (7, 7), Conv(3, 2, kernel=(1, 1), stride=(2, 2), padding=(0, 0), bias=False),
    ),
    Case("1x3_p01_bias_n3", "single", 3, (5, 7), Conv(2, 3, kernel=(1, 3), padding=(0, 1))),
    Case(
        "1x3_stride21_groups2_nobias_n1",
        "single", 1, (7, 5), Conv(4, 4, kernel=(1, 3), stride=(2, 1), padding=(0, 0), groups=2, bias=False),
    ),
    Case(
        "3x1_stride12_dilation21_bias_n3",
        "single", 3, (9, 5), Conv(3, 2, kernel=(3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    ),
    Case("linear_first_bias_n3", "mlp", 3, widths=(6, 4, 3), biases=(True, True, True), target=0),
    Case("linear_hidden_nobias_n1", "mlp", 1, widths=(6, 4, 3), biases=(True, False, True), target=2),
    Case("linear_head_bias_n3", "deep", 3, (5, 5), Conv(3, 4), Conv(4, 3), target=6),
    Case("linear_first_nobias_n1", "mlp", 1, widths=(5, 4, 3), biases=(False, True, True), target=0),
)


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def build(case: Case, seed_salt: str = "") -> Tuple[nn.Sequential, Tensor]:
    """The float64 network of a case (seeded from its name) and its input x."""
    torch.manual_seed(zlib.crc32((case.name + seed_salt).encode()))
    if case.net == "mlp":
        w, b = case.widths, case.biases
        net = nn.Sequential(
            nn.Linear(w[0], w[1], bias=b[0]), nn.Tanh(),
            nn.Linear(w[1], w[2], bias=b[1]), nn.Tanh(),
            nn.Linear(w[2], CLASSES, bias=b[2]),
        )
        return net.double(), torch.randn(case.n, w[0], dtype=torch.float64)
    x = torch.randn(case.n, case.conv1.c_in, *case.hw, dtype=torch.float64)
    conv1 = case.conv1.module().double()
    if case.net == "single":
        features = conv1(x)[0].numel()
        net = nn.Sequential(conv1, nn.Tanh(), nn.Flatten(), nn.Linear(features, CLASSES))
    else:
        net = nn.Sequential(
            conv1, nn.ReLU(), case.conv2.module(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(case.conv2.c_out, CLASSES),
        )
    return net.double(), x


def layer_geometry(layer: nn.Module) -> dict:
    """unfolded_gram's geometry arguments for a Conv2d or Linear module."""
    if isinstance(layer, nn.Linear):
        one = (1, 1)
        return dict(
            kernel_size=one, stride=one, padding=(0, 0), dilation=one, groups=1, bias=layer.bias is not None
        )
    return dict(
        kernel_size=tuple(layer.kernel_size), stride=tuple(layer.stride), padding=tuple(layer.padding),
        dilation=tuple(layer.dilation), groups=layer.groups, bias=layer.bias is not None,
    )


# ---------------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------------


@dataclass
class BruteForce:
    """Everything the tests need about one layer of one network, in float64."""

    logits: Tensor  # [N, C], detached
    p: Tensor  # [N, C] softmax probabilities
    jac: Tensor  # [N, C, P] per-example Jacobian of the logits wrt the layer's parameters
    blocks: Tensor  # [C_out, D', D'] exact GGN blocks of the summed cross-entropy
    index: Tensor  # [C_out, D'] the parameter indices (into jac's last dim) of each block
    layer_input: Tensor  # the layer's input x
    per_class: Tensor  # [N, C, C_out, *spatial]: d logit_c / dz_n (back-propagated unit vectors)
    geometry: dict = field(default_factory=dict)


def brute_force(net: nn.Sequential, x: Tensor, target: int) -> BruteForce:
    layer = net[target]
    prefix = f"{target}."
    params = {k: v.detach() for k, v in net.named_parameters()}
    mine = {k: v for k, v in params.items() if k.startswith(prefix)}
    others = {k: v for k, v in params.items() if not k.startswith(prefix)}

    def logits_of_one(layer_params, xi):
        return functional_call(net, {**others, **layer_params}, (xi.unsqueeze(0),)).squeeze(0)

    jacs = vmap(jacrev(logits_of_one), in_dims=(None, 0))(mine, x)  # name -> [N, C, *param shape]
    weight = layer.weight
    has_bias = layer.bias is not None
    parts = [jacs[prefix + "weight"].flatten(2)] + ([jacs[prefix + "bias"]] if has_bias else [])
    jac = torch.cat(parts, dim=2)  # [N, C, P], P = W.numel() (+ C_out)

    captured = {}
    hook = layer.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0], z=out))
    logits = net(x)
    hook.remove()
    p = torch.softmax(logits.detach(), dim=-1)
    hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [N, C, C]
    ggn = torch.einsum("nci,ncd,ndj->ij", jac, hessian, jac)

    c_out, d = weight.shape[0], weight[0].numel()
    index = torch.arange(c_out * d).reshape(c_out, d)
    if has_bias:
        index = torch.cat((index, weight.numel() + torch.arange(c_out).unsqueeze(1)), dim=1)
    blocks = torch.stack([ggn[i][:, i] for i in index])

    n = x.shape[0]
    units = torch.eye(logits.shape[1], dtype=logits.dtype).expand(n, -1, -1)
    per_class = backprop(logits, captured["z"], units)
    return BruteForce(
        logits.detach(), p, jac, blocks, index, captured["x"].detach(), per_class, layer_geometry(layer)
    )


def backprop(logits: Tensor, z: Tensor, v: Tensor) -> Tensor:
    """S[n, k] = d(v[n, k]^T logits[n]) / dz[n], one backward pass per k (examples are independent,
    so the gradient of the batch sum wrt z[n] is example n's own). v [N, K, C] -> [N, K, *z[0].shape]."""
    grads = [torch.autograd.grad(logits, z, v[:, k], retain_graph=True)[0] for k in range(v.shape[1])]
    return torch.stack(grads, dim=1).detach()


def factors_from_v(bf: BruteForce, v: Tensor) -> Tensor:
    """Back-propagated factors for any v [N, K, C], by linearity from the per-class ones."""
    return torch.einsum("nkc,nc...->nk...", v, bf.per_class)


def rel_norm_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


# ---------------------------------------------------------------------------------------------
# Rung 1: exact blocks against brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_exact_blocks_match_brute_force(case: Case):
    net, x = build(case)
    bf = brute_force(net, x, case.target)
    v = reference.softmax_ce_hessian_factors(bf.logits, "exact")
    # the factors straight from autograd, as a user would get them (not via per_class)
    captured = {}
    hook = net[case.target].register_forward_hook(lambda m, inp, out: captured.update(z=out))
    logits = net(x)
    hook.remove()
    factors = backprop(logits, captured["z"], v)
    assert factors.shape[:3] == (case.n, CLASSES, bf.blocks.shape[0])

    got = reference.unfolded_gram(bf.layer_input, factors, **bf.geometry)
    assert got.dtype == torch.float64
    assert got.shape == bf.blocks.shape
    scale = float(bf.blocks.abs().max())
    assert scale > 0
    # float64 throughout, two different summation orders of the same terms: measured <= 4e-16
    # norm-wise relative on every case, so 1e-8 only catches real mistakes
    assert_within(got, bf.blocks, {"rtol": 1e-8, "atol": 1e-8 * scale}, case.name)
    assert rel_norm_error(got, bf.blocks) <= 1e-8


def test_linear_input_2d_equals_1x1_view():
    case = case_named("linear_first_bias_n3")
    net, x = build(case)
    bf = brute_force(net, x, case.target)
    factors = factors_from_v(bf, reference.softmax_ce_hessian_factors(bf.logits, "exact"))
    flat = reference.unfolded_gram(bf.layer_input, factors, **bf.geometry)
    as_image = reference.unfolded_gram(
        bf.layer_input[:, :, None, None], factors[..., None, None], **bf.geometry
    )
    assert torch.equal(flat, as_image)


# ---------------------------------------------------------------------------------------------
# Rung 2: the factors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_exact_factors_reproduce_softmax_hessian(scale: float):
    gen = torch.Generator().manual_seed(11)
    logits = scale * torch.randn(6, 7, dtype=torch.float64, generator=gen)
    v = reference.softmax_ce_hessian_factors(logits, "exact")
    assert v.shape == (6, 7, 7) and v.dtype == torch.float64
    p = torch.softmax(logits, dim=-1)
    hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    assert_within(torch.einsum("nkc,nkd->ncd", v, v), hessian, {"rtol": 0.0, "atol": 1e-12}, "sum_k v v^T")
    # and it is the Hessian of the SUMMED cross-entropy (labels do not matter)
    labels = torch.randint(7, (6,), generator=gen)
    autograd_h = torch.autograd.functional.hessian(
        lambda f: nn.functional.cross_entropy(f, labels, reduction="sum"), logits
    )  # [6, 7, 6, 7]
    per_example = torch.stack([autograd_h[n, :, n, :] for n in range(6)])
    assert_within(per_example, hessian, {"rtol": 0.0, "atol": 1e-12}, "autograd Hessian")


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0, 1000.0])
@pytest.mark.parametrize("classes", [2, 7])
def test_minimal_exact_factors_reproduce_softmax_hessian(scale: float, classes: int):
    """C - 1 factors (a Householder basis of the complement of sqrt(p)) give the same Hessian, also
    when p is nearly one-hot (scale 1000), where sqrt(p) is almost a basis vector."""
    gen = torch.Generator().manual_seed(13)
    logits = scale * torch.randn(6, classes, dtype=torch.float64, generator=gen)
    v = reference.softmax_ce_hessian_factors(logits, "exact", minimal=True)
    assert v.shape == (6, classes - 1, classes) and v.dtype == torch.float64
    p = torch.softmax(logits, dim=-1)
    hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    assert_within(torch.einsum("nkc,nkd->ncd", v, v), hessian, {"rtol": 0.0, "atol": 1e-14}, "sum_k v v^T")
    # float32 logits: computed in float32, still the Hessian to float32 rounding
    v32 = reference.softmax_ce_hessian_factors(logits.float(), "exact", minimal=True)
    assert_within(torch.einsum("nkc,nkd->ncd", v32, v32).double(), hessian, {"rtol": 0.0, "atol": 1e-6}, "float32")


def test_mc_factors_are_one_hot_minus_p():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(50, 4, dtype=torch.float64, generator=gen)
    v = reference.softmax_ce_hessian_factors(logits, "mc", generator=torch.Generator().manual_seed(5))
    again = reference.softmax_ce_hessian_factors(logits, "mc", generator=torch.Generator().manual_seed(5))
    assert v.shape == (50, 1, 4) and torch.equal(v, again)
    onehot = v[:, 0] + torch.softmax(logits, dim=-1)
    assert torch.allclose(onehot.sum(1), torch.ones(50, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(onehot, onehot.round(), atol=1e-14)


MC_CASE = Case("mc_small_3x3_bias_deep", "deep", 2, (5, 5), Conv(2, 2), Conv(2, 3), target=0)
MC_DRAWS = (250, 1000, 4000)


def test_mc_blocks_are_unbiased():
    """The mean of M single-draw (K = 1) Monte-Carlo blocks converges to the exact blocks.

    How the bound was chosen: the labels take finitely many values, so the covariance of the
    single-draw estimate G1 = sum_n T_n(y_n), T_n(y)[o] = j j^T with j = J_{n,o}^T (e_y - p_n), is
    known exactly: E||G1 - G||_F^2 = sum_n (sum_y p_{n,y} ||T_n(y)||_F^2 - ||E_y T_n(y)||_F^2).
    The mean of M independent draws has E||G_M - G||_F^2 = that / M, i.e. a predicted RMS relative
    error rms(M) = sqrt(var / M) / ||G||_F. We require the observed error <= 4 rms(M) at every M
    (Markov on the squared error: a fresh seed fails with probability <= 1/16; the seed is fixed, so
    the test is deterministic), a bound that shrinks like 1 / sqrt(M); and for this layer
    4 rms(4000) <= 0.05, so the mean of 4000 draws is within 5% of the exact blocks.
    """
    net, x = build(MC_CASE)
    bf = brute_force(net, x, MC_CASE.target)
    exact = bf.blocks
    m = MC_DRAWS[-1]
    n, c = bf.logits.shape

    # All M draws at once: tile the logits, draw one label per row, and use the M draws of
    # example n as its K = M factors; the Gram of K factors / M is the mean of M single-draw blocks.
    gen = torch.Generator().manual_seed(2019)
    v = reference.softmax_ce_hessian_factors(bf.logits.repeat(m, 1), "mc", generator=gen)  # [M N, 1, C]
    v = v.reshape(m, n, c).transpose(0, 1)  # [N, M, C]
    factors = factors_from_v(bf, v)

    # exact variance of the single-draw estimate, from the brute-force Jacobian
    var = 0.0
    for i in range(n):
        jo = bf.jac[i][:, bf.index]  # [C, C_out, D']
        outer = torch.eye(c, dtype=torch.float64) - bf.p[i]  # row y: e_y - p
        j = torch.einsum("yc,cod->yod", outer, jo)  # [Y, C_out, D']
        t = j.unsqueeze(3) * j.unsqueeze(2)  # [Y, C_out, D', D']
        mean_t = torch.einsum("y,y...->...", bf.p[i], t)
        var += float((bf.p[i] * t.pow(2).sum((1, 2, 3))).sum() - mean_t.pow(2).sum())

    norm = float(exact.norm())
    for draws in MC_DRAWS:
        got = reference.unfolded_gram(bf.layer_input, factors[:, :draws], **bf.geometry) / draws
        err = rel_norm_error(got, exact)
        rms = math.sqrt(var / draws) / norm
        assert err <= 4 * rms, f"M = {draws}: relative error {err:.4f} > 4 x predicted RMS {rms:.4f}"
    assert 4 * math.sqrt(var / m) / norm <= 0.05
    assert err < 0.05


# ---------------------------------------------------------------------------------------------
# Rung 3: low-precision inputs
# ---------------------------------------------------------------------------------------------

# Norm-wise relative error of the float32 result against the float64 result on the UNROUNDED
# float64 inputs. Rounding x and S to the low-precision format perturbs each by a relative
# u = 2^-8 (bfloat16) or 2^-11 (float16); every term of G[o] is a product of two S and two X
# values, so it moves by <= 4u (~1.6% for bfloat16), and the sums of such terms move by a norm-wise
# relative ~4u / sqrt(#terms) on average (independent rounding errors partly cancel); the float32
# accumulation (2^-24 per operation) is negligible next to it. The bound is the worst case 4u
# (measured: 1.6e-3 and 2.8e-3 for bfloat16, 1.8e-4 and 3.7e-4 for float16). Back-propagated
# factors can be tiny (4e-8 here, below float16's smallest normal 6.1e-5, so they become subnormal
# and lose relative precision), but such factors carry a negligible part of the norm.
# Against the float64 result on the ROUNDED inputs only the float32 accumulation remains:
# 2^-24 times a few hundred terms at most, bounded by 1e-5 (measured <= 1e-7).
LOW_PRECISION = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize(
    "case", [case_named("3x3_p1_bias_deep_first_n3"), case_named("3x3_groups2_p1_bias_n3")], ids=str
)
def test_low_precision_accumulates_in_float32(case: Case, dtype: torch.dtype):
    net, x = build(case)
    bf = brute_force(net, x, case.target)
    factors = factors_from_v(bf, reference.softmax_ce_hessian_factors(bf.logits, "exact"))
    exact = reference.unfolded_gram(bf.layer_input, factors, **bf.geometry)
    x_low, f_low = bf.layer_input.to(dtype), factors.to(dtype)
    got = reference.unfolded_gram(x_low, f_low, **bf.geometry)
    assert got.dtype == torch.float32
    assert rel_norm_error(got, exact) <= LOW_PRECISION[dtype]
    on_rounded = reference.unfolded_gram(x_low.double(), f_low.double(), **bf.geometry)
    assert rel_norm_error(got, on_rounded) <= 1e-5


@pytest.mark.parametrize("diagonal", [False, True])
def test_the_reference_takes_empty_inputs_as_the_kernel_does(diagonal):
    """No input channels: the blocks hold only the bias coordinate, from the factors' sums."""
    f = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    x = torch.randn(2, 0, 5, 5, dtype=torch.float64)
    got = reference.unfolded_gram(x, f, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, diagonal)
    expected = torch.ops.bnas_fast.unfolded_gram(x, f, [3, 3], [1, 1], [1, 1], [1, 1], 1, True, diagonal)
    torch.testing.assert_close(got, expected)
    assert got.shape == ((4, 1) if diagonal else (4, 1, 1))
