"""bnas_fast.curvature.diagonal_recursion_hessians: BayesNAS's truncated diagonal recursion (notes
section 2.1). (a) against the same recursion written out with dense per-layer Jacobians
(torch.func.jacrev, float64, per example) on a branching network with strided, dilated, depthwise and
1x1 convolutions, eval BatchNorm, ReLU, max/avg/adaptive pooling, switches, sums and a concatenation;
(b) equal to the exact GGN diagonal (GGNBlocks) where the truncation is exact; (c) on the BayesNAS
super-network: finite, non-negative, rank-correlated with the exact switch Hessians, and usable
by the search; (d) bad input raises.
"""

import math

import pytest
import torch
from torch import nn

from bnas_fast.curvature import GGNBlocks, Switch, diagonal_recursion_hessians
from bnas_fast.methods import bayesnas
from bnas_fast.nn.bayesnas import BayesNASSupernet

# ----------------------------------------------------------------------------------------------
# brute force: the truncated recursion node by node with dense Jacobians
# ----------------------------------------------------------------------------------------------


def _brute_force(model, spec, x):
    """The recursion with dense Jacobians. ``spec``: [(module name or callable, [input keys], output
    key)] in topological order, from "x" to "logits". Per example n: h(logits) = p (1 - p); for each
    node backwards, h(input_i) += (J_i o J_i)^T h(output) with J_i = d output / d input_i, and each
    parameter's curvature += (J_theta o J_theta)^T h(output). Returns {module name: {param: diag}}."""
    modules = dict(model.named_modules())
    diag = {}
    for n in range(x.shape[0]):
        values = {"x": x[n : n + 1]}
        fns = []
        for key, ins, out in spec:
            if isinstance(key, str):
                m = modules[key]
                params = {k: v.detach() for k, v in m.named_parameters()}
                buffers = {k: v.detach() for k, v in m.named_buffers()}

                def fn(p, *a, m=m, buffers=buffers):
                    return torch.func.functional_call(m, ({**p, **buffers},), a)
            else:
                params, fn = {}, (lambda p, *a, op=key: op(*a))
            fns.append((fn, params))
            values[out] = fn(params, *[values[i] for i in ins])
        p = torch.softmax(values["logits"], -1)
        h = {k: torch.zeros_like(v) for k, v in values.items()}
        h["logits"] = p * (1 - p)
        for (key, ins, out), (fn, params) in zip(reversed(spec), reversed(fns)):
            args = [values[i] for i in ins]
            h_out = h[out].flatten()
            jac_in = torch.func.jacrev(fn, argnums=tuple(range(1, 1 + len(ins))))(params, *args)
            for i, J in zip(ins, jac_in):
                J = J.reshape(h_out.numel(), -1)
                h[i] = h[i] + (J.square().t() @ h_out).reshape(values[i].shape)
            if params:
                for pname, J in torch.func.jacrev(fn, argnums=0)(params, *args).items():
                    J = J.reshape(h_out.numel(), -1)
                    d = (J.square().t() @ h_out).reshape(params[pname].shape)
                    slot = diag.setdefault(key, {})
                    slot[pname] = slot.get(pname, 0) + d
    return diag


def _layout(module, d):
    """{param: diag} in the layout of GGNBlocks.compute(diagonal=True)."""
    if isinstance(module, Switch):
        return d["weight"].reshape(1, 1)
    if isinstance(module, nn.BatchNorm2d):
        return torch.stack([d["weight"], d["bias"]], 1)
    cols = [d["weight"].flatten(1)]
    if "bias" in d:
        cols.append(d["bias"][:, None])
    return torch.cat(cols, 1)


class _Branchy(nn.Module):
    """conv (stride 2) - BN - ReLU, then three switched branches of one tensor (depthwise dilated conv;
    overlapping max pool; avg pool without padding counts), a sum and a concatenation, a 1x1 conv
    mixing channels, a strided ceil-mode avg pool, an adaptive avg pool with overlapping windows, a
    switch and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.sw_a, self.sw_b, self.sw_c, self.sw_out = Switch(0.8), Switch(1.3), Switch(0.6), Switch(1.1)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
        self.pool_b = nn.MaxPool2d(3, 1, 1)
        self.pool_c = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.conv_d = nn.Conv2d(8, 3, 1)
        self.pool_d = nn.AvgPool2d(3, 2, 1, ceil_mode=True)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = self.relu(self.bn(self.conv1(x)))
        u = self.conv_a(self.sw_a(h)) + self.pool_b(self.sw_b(h))
        v = torch.cat([u, self.pool_c(self.sw_c(h))], 1)
        w = self.gap(self.pool_d(self.conv_d(v)))
        return self.fc(self.sw_out(w).flatten(1))


_BRANCHY_SPEC = [
    ("conv1", ["x"], "c1"), ("bn", ["c1"], "b"), ("relu", ["b"], "h"),
    ("sw_a", ["h"], "ha"), ("conv_a", ["ha"], "ua"), ("sw_b", ["h"], "hb"), ("pool_b", ["hb"], "ub"),
    (torch.add, ["ua", "ub"], "u"), ("sw_c", ["h"], "hc"), ("pool_c", ["hc"], "vc"),
    (lambda a, b: torch.cat([a, b], 1), ["u", "vc"], "v"),
    ("conv_d", ["v"], "d"), ("pool_d", ["d"], "dp"), ("gap", ["dp"], "g"), ("sw_out", ["g"], "gs"),
    (lambda a: a.flatten(1), ["gs"], "f"), ("fc", ["f"], "logits"),
]


class _Chain(nn.Module):
    """Linear - Switch - ReLU - Linear (no branching)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.relu, self.fc2 = nn.Linear(5, 6), Switch(0.9), nn.ReLU(), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(self.relu(self.gate(self.fc1(x))))


_CHAIN_SPEC = [("fc1", ["x"], "a"), ("gate", ["a"], "b"), ("relu", ["b"], "c"), ("fc2", ["c"], "logits")]


@pytest.mark.parametrize("case", ["chain", "branchy"])
def test_equals_dense_jacobian_recursion(case):
    torch.manual_seed(3)
    if case == "chain":
        model, spec, x = _Chain().double(), _CHAIN_SPEC, torch.randn(3, 5, dtype=torch.float64)
    else:
        model, spec, x = _Branchy().double(), _BRANCHY_SPEC, torch.randn(3, 2, 9, 9, dtype=torch.float64)
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.3, 0.3)
    model.eval()
    expected = _brute_force(model, spec, x)
    got = diagonal_recursion_hessians(model, x)
    modules = dict(model.named_modules())
    assert set(got) == set(expected)
    for name, d in expected.items():
        torch.testing.assert_close(got[name], _layout(modules[name], d), rtol=1e-9, atol=1e-13, msg=name)
    assert all(bool((v >= 0).all()) for v in got.values())
    # the recursion is not the exact GGN: below the first mixing layer they differ
    with GGNBlocks(model) as curvature:
        logits = model(x)
    exact = curvature.compute(logits, "exact", diagonal=True)
    first = "conv1" if case == "branchy" else "fc1"
    assert not torch.allclose(got[first], exact[first], rtol=1e-3)
    # the last layer's weights are exact: d logit_c / d W[c, j] = input_j, one logit per weight
    last = "fc" if case == "branchy" else "fc2"
    torch.testing.assert_close(got[last], exact[last], rtol=1e-9, atol=1e-13)


class _PerClass(nn.Module):
    """Linear, then per logit c: Switch - ReLU - Switch. Every switch and every linear weight reaches a
    single logit through element-wise layers only, so the truncation drops nothing for them."""

    def __init__(self, classes=4):
        super().__init__()
        self.fc = nn.Linear(6, classes)
        self.s1 = nn.ModuleList(Switch(0.5 + 0.3 * c) for c in range(classes))
        self.s2 = nn.ModuleList(Switch(1.4 - 0.2 * c) for c in range(classes))

    def forward(self, x):
        z = self.fc(x)
        z = torch.relu(torch.cat([s(z[:, c : c + 1]) for c, s in enumerate(self.s1)], 1))
        return torch.cat([s(z[:, c : c + 1]) for c, s in enumerate(self.s2)], 1)


def test_equals_exact_ggn_diagonal_where_the_truncation_is_exact():
    torch.manual_seed(4)
    model = _PerClass().double()
    x = torch.randn(7, 6, dtype=torch.float64)
    got = diagonal_recursion_hessians(model, x)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    exact = curvature.compute(logits, "exact", diagonal=True)
    assert set(got) == set(exact) and len(got) == 9
    for name in exact:
        torch.testing.assert_close(got[name], exact[name], rtol=1e-9, atol=1e-13, msg=name)
    # and the same from the exact GGN written with torch.func (sum over examples, no batch averaging)
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    p = torch.softmax(logits.detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for c in range(4):
        J = jac[f"s1.{c}.weight"]  # [N, C]
        assert float(got[f"s1.{c}"]) == pytest.approx(float(torch.einsum("nc,ncd,nd->", J, H, J)), rel=1e-9)


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_bayesnas_supernet_is_supported_and_rank_correlated_with_the_exact_switch_hessians():
    torch.manual_seed(0)
    net = BayesNASSupernet(1, 10, channels=4).eval()
    x = torch.randn(8, 1, 8, 8)
    got = diagonal_recursion_hessians(net, x)
    with GGNBlocks(net) as curvature:
        logits = net(x)
    exact = curvature.compute(logits, "exact", diagonal=True)
    assert set(got) == set(exact)
    switches = [n for n, m in net.named_modules() if isinstance(m, Switch)]
    assert len(switches) == 3 * 8 * 6
    a = torch.tensor([float(got[n]) for n in switches], dtype=torch.float64)
    e = torch.tensor([float(exact[n]) for n in switches], dtype=torch.float64)
    assert bool(torch.isfinite(a).all()) and bool((a >= 0).all()) and float(a.min()) > 0
    rho = _spearman(a, e)
    assert rho > 0.6, rho  # measured 0.79 (seed 0)
    torch.testing.assert_close(got["classifier"], exact["classifier"], rtol=1e-4, atol=1e-8)
    # switch_hessians' new mode: per example (/ N), averaged over batches, grouped
    H = bayesnas.switch_hessians(net, [x[:4], x[4:]], "diag_recursion")
    names = net.switch_names()
    first = switches[0]
    halves = [float(diagonal_recursion_hessians(net, xb)[first]) / 4 for xb in (x[:4], x[4:])]
    assert H[names[first]][0] == pytest.approx(sum(halves) / 2, rel=1e-5)
    assert set(H) == set(net.switch_groups())


def test_search_runs_with_the_diag_recursion_mode(tmp_path):
    config = dict(dataset="digits", seed=0, n_train=128, n_test=64, channels=4, warmup_epochs=0, search_epochs=1,
                  retrain_epochs=0, hessian_batches=1, hessian_batch_size=32, random_candidates=3, progress=False,
                  plots=False, out_dir=str(tmp_path), hessian_mode="diag_recursion")
    r = bayesnas.run(config)
    assert r["config"]["hessian_mode"] == "diag_recursion"
    values = [v for cell in r["hessian"].values() for e in cell.values() for v in e.values() for v in v]
    assert values and all(math.isfinite(v) and v >= 0 for v in values) and max(values) > 0
    assert all(v > 0 for cell in r["gamma"].values() for e in cell.values() for v in e.values())
    assert bayesnas.BayesNASConfig().hessian_mode == "exact"  # the default is unchanged


class _FunctionalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return nn.functional.avg_pool2d(self.conv(x), 2).flatten(1)


def test_unsupported_layers_and_bad_input_raise():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"layer '1' \(LayerNorm\) has parameters but is not supported"):
        diagonal_recursion_hessians(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), x)
    with pytest.raises(TypeError, match=r"operation 'tanh' \(TanhBackward0\) in layer '1' \(Tanh\)"):
        diagonal_recursion_hessians(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), x)
    # a functional op with non-0/1 coefficients in a container's forward is named with the container
    with pytest.raises(TypeError, match=r"\(AvgPool2DBackward0\) in layer '_FunctionalPool' \(_FunctionalPool\)"):
        diagonal_recursion_hessians(_FunctionalPool(), torch.randn(2, 1, 6, 6))
    with pytest.raises(TypeError, match=r"\(MulBackward0\) in layer '1' \(Dropout\)"):
        diagonal_recursion_hessians(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train(), x)
    with pytest.raises(TypeError, match=r"layer '0': only zero padding is supported"):
        diagonal_recursion_hessians(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")), torch.randn(2, 1, 5, 5))
    with pytest.raises(TypeError, match=r"layer '0': padding='same' .* pads unevenly"):
        diagonal_recursion_hessians(nn.Sequential(nn.Conv2d(1, 2, (3, 2), padding="same")), torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' uses batch statistics"):
        diagonal_recursion_hessians(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train(), x)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="the input of layer '0' contains NaN or infinity"):
        diagonal_recursion_hessians(model, torch.full((2, 3), float("inf")))
    with pytest.raises(ValueError, match="the input of layer '0' contains NaN or infinity"):
        diagonal_recursion_hessians(model, torch.full((2, 3), float("nan")))
    big = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        big[0].weight.fill_(3e38)
    with pytest.raises(ValueError, match="the logits contain NaN or infinity"):  # finite input, overflowing logits
        diagonal_recursion_hessians(big, torch.ones(2, 3))
    # 0/1-Jacobian modules (ReLU, max pooling, dropout in eval, identity, flatten) are fine
    ok = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5), nn.Identity(), nn.Flatten(),
                       nn.Linear(8, 3)).eval()
    out = diagonal_recursion_hessians(ok, torch.randn(2, 1, 6, 6))
    assert set(out) == {"0", "6"} and out["0"].shape == (2, 10) and out["6"].shape == (3, 9)


class _TripledLinear(nn.Linear):
    def forward(self, x):
        return 3 * super().forward(x)


class _LoRALinear(nn.Linear):
    def __init__(self, i, o):
        super().__init__(i, o)
        self.A = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight + self.A, self.bias)


class _GatedMax(nn.Module):
    """A Switch then max pooling: an infinite input entry gives finite logits (the max picks
    another entry) but a NaN switch curvature (inf * 0 in sum x^2 h)."""

    def __init__(self):
        super().__init__()
        self.gate, self.pool, self.head = Switch(), nn.MaxPool2d(2), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.pool(self.gate(x)).flatten(1))


def test_review_cases_raise_instead_of_returning_wrong_values():
    """The review of 2026-12-02 (eighth session) found these silently wrong; now each raises,
    naming the layer."""
    x = torch.randn(2, 3)
    for layer in (_TripledLinear(3, 2), _LoRALinear(3, 2)):
        with pytest.raises(TypeError, match=r"layer '1' \(_\w+Linear, a Linear\) (overrides forward|has parameters \['A'\])"):
            diagonal_recursion_hessians(nn.Sequential(nn.Linear(3, 3), layer), x)
    x4 = torch.randn(2, 1, 4, 4)
    x4[0, 0, 0, 0] = -float("inf")
    model = _GatedMax()
    assert bool(torch.isfinite(model(x4)).all())  # the logits alone would not tell
    with pytest.raises(ValueError, match="the input of layer 'gate' contains NaN or infinity"):
        diagonal_recursion_hessians(model, x4)
    with pytest.raises(RuntimeError, match="the input of layer 'b' was modified in place after the layer ran"):
        diagonal_recursion_hessians(_ReadThenChanged(), x)
    # an operation PyTorch builds from another (AvgPool1d runs avg_pool2d) is named with its layer
    with pytest.raises(TypeError, match=r"\(AvgPool2DBackward0\) in layer '1' \(AvgPool1d\)"):
        diagonal_recursion_hessians(nn.Sequential(nn.Identity(), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4, 2)),
                                    torch.randn(2, 2, 4))
    # its own passes need autograd: under torch.no_grad() it turns it on (same values), inference mode raises
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        under_no_grad = diagonal_recursion_hessians(plain, x)
    for name, value in diagonal_recursion_hessians(plain, x).items():
        assert torch.equal(under_no_grad[name], value), name
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) forbids"):
        diagonal_recursion_hessians(plain, x)


class _ReadThenChanged(nn.Module):
    """Layer b reads h, then h is changed in place (its values are what b's rule would read)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.relu_()
        return out + self.c(h)
