"""bnas_fast.curvature.GGNBlocks against brute force (issue 6, in progress): the exact GGN of the
summed cross-entropy, J^T (diag(p) - p p^T) J per example, with J from torch.func over the whole
batch, cut into each layer's per-output-channel blocks. Float64, tiny networks with strided,
dilated and grouped convolutions, BatchNorm in eval and in train mode, a switch and linear layers.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnas_fast
from bnas_fast.curvature import GGNBlocks, Switch


class _Net(nn.Module):
    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.norm = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.gate = Switch(0.7)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.norm(self.conv2(h)))
        h = nn.functional.avg_pool2d(h, 2, ceil_mode=True)
        return self.head(self.gate(h).flatten(1))


def _brute_force(model, x):
    """{layer: blocks} from the full-batch Jacobian of the logits (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def logits_of(p):
        return torch.func.functional_call(model, (p, buffers), (x,))

    logits = logits_of(params)
    jac = torch.func.jacrev(logits_of)(params)  # {name: [N, C, *shape]}
    prob = torch.softmax(logits, -1)
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # [N, C, C]
    N, C = logits.shape

    def blocks(weight_name, bias_name, rows):
        cols = [jac[weight_name].reshape(N, C, rows, -1)]
        if bias_name in jac:
            cols.append(jac[bias_name].reshape(N, C, rows, 1))
        J = torch.cat(cols, -1)  # [N, C, rows, D']
        return torch.einsum("ncod,nce,neof->odf", J, H, J)

    out = {
        "conv1": blocks("conv1.weight", "conv1.bias", 4),
        "conv2": blocks("conv2.weight", "conv2.bias", 4),
        "gate": blocks("gate.weight", "-", 1),
        "head": blocks("head.weight", "head.bias", 5),
    }
    if "norm.weight" in jac:
        out["norm"] = blocks("norm.weight", "norm.bias", 4)
    return out


@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
def test_exact_blocks_equal_brute_force(train):
    torch.manual_seed(0)
    model = _Net().double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.3, 0.3)
    model.train(train)
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    twin = copy.deepcopy(model)
    if train:  # same batch-statistics output, without the in-place running-stat update torch.func rejects
        twin.norm.track_running_stats = False
    expected = _brute_force(twin, x)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    got = curvature.compute(logits, "exact")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)
    diagonals = curvature.compute(logits, "exact", diagonal=True)
    for name in expected:
        torch.testing.assert_close(diagonals[name], expected[name].diagonal(dim1=1, dim2=2), rtol=1e-8, atol=1e-12, msg=name)


def test_monte_carlo_blocks_are_unbiased():
    torch.manual_seed(1)
    model = _Net(batch_norm=False).double().eval()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    exact = curvature.compute(logits, "exact")["head"]
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    mean = sum(curvature.compute(logits, "mc", gen)["head"] for _ in range(draws)) / draws
    error = float((mean - exact).norm() / exact.norm())
    single = float((curvature.compute(logits, "mc", gen)["head"] - exact).norm() / exact.norm())
    # a single draw is far off; the mean of 3000 is within a few percent (the error shrinks as 1/sqrt(draws))
    assert error < 0.1 and error < single / 5, (error, single)


def test_unsupported_layers_and_misuse_raise():
    with pytest.raises(TypeError, match=r"layer '1' \(LayerNorm\) has parameters but is not supported"):
        GGNBlocks(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(TypeError, match=r"layer '0': only zero padding is supported, got padding_mode='reflect'"):
        GGNBlocks(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")))
    with pytest.raises(TypeError, match=r"layer '0': padding='same' with kernel_size=\(2, 2\) .* pads unevenly"):
        GGNBlocks(nn.Sequential(nn.Conv2d(2, 2, 2, padding="same")))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    curvature = GGNBlocks(model)
    with pytest.raises(RuntimeError, match=r"no forward pass recorded for \['0', '2'\]"):
        curvature.compute(torch.zeros(2, 2, requires_grad=True))
    with curvature:
        logits = model(torch.randn(5, 3))
    with pytest.raises(ValueError, match="mode must be 'exact' or 'mc'"):
        curvature.compute(logits, "diag")
    with pytest.raises(ValueError, match="the logits contain NaN"):
        curvature.compute(logits * float("nan"))
    with curvature:
        model(torch.randn(5, 3))
        logits = model(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"ran more than once inside the context"):
        curvature.compute(logits)
    with curvature:
        logits = model(torch.full((5, 3), float("inf")))
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        curvature.compute(logits)
    # logits of another forward pass (outside the context), or an unrelated tensor: not zero blocks but an error
    with curvature:
        model(torch.randn(5, 3))
    for foreign in (model(torch.randn(5, 3)), torch.randn(7, 2, requires_grad=True)):
        with pytest.raises(ValueError, match=r"logits do not depend on any layer output recorded in the context"):
            curvature.compute(foreign)


@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
@pytest.mark.parametrize("by", ["module", "name"])
def test_selected_layers_get_the_same_blocks_as_all_layers(train, by):
    """layers=: only the named layers get blocks, equal (bit for bit) to those of a run over every
    layer: the factors' backward pass is the same, only the other layers' products are skipped."""
    torch.manual_seed(3)
    model = _Net().double().train(train)
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64)
    with GGNBlocks(model) as curvature:
        every = curvature.compute(model(x), "exact")
    chosen = ["gate", "conv1"]
    layers = chosen if by == "name" else [getattr(model, name) for name in chosen]
    with GGNBlocks(model, layers=layers) as curvature:
        some = curvature.compute(model(x), "exact")
    assert sorted(some) == sorted(chosen)
    for name in chosen:
        assert torch.equal(some[name], every[name]), name


def _count_backward_passes(monkeypatch) -> list:
    """Patches torch.autograd.grad to record how many cotangents each backward pass receives;
    returns the list it fills."""
    passes = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, grad_outputs=None, **kwargs):
        passes.append(grad_outputs.shape[0])
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return passes


@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
@pytest.mark.parametrize("factors_per_pass", [1, 2, 5])
def test_factors_back_propagated_in_chunks_give_the_same_blocks(train, factors_per_pass, monkeypatch):
    """max_factor_bytes: the factors go back in passes of at most that many bytes (counted in the
    cotangents each autograd pass receives), and the blocks summed over the passes equal one pass
    over all of them (float64, up to the order of the sums)."""
    torch.manual_seed(5)
    model = _Net().double().train(train)
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    # Without the rank-one route, which splits each pass in two (a single factor per pass is always
    # of rank one); test_rank_one_route_gives_the_brute_force_blocks chunks with it.
    with GGNBlocks(model, rank_one_backward=False) as curvature:
        logits = model(x)
    everything = curvature.compute(logits, "exact", max_factor_bytes=2**40)
    per_factor = sum(r.output.numel() * r.output.element_size() for r in curvature.records)
    passes = _count_backward_passes(monkeypatch)
    # couples_examples given: no probe pass (counted otherwise)
    chunked = curvature.compute(logits, "exact", max_factor_bytes=factors_per_pass * per_factor + per_factor // 2,
                                couples_examples=train)
    monkeypatch.undo()
    total = logits.shape[0] * 4 if train else 4  # N K cotangents with train-mode BN, else K (C - 1 = 4)
    assert sum(passes) == total and max(passes) == min(factors_per_pass, total), passes
    assert set(chunked) == set(everything)
    for name in everything:
        torch.testing.assert_close(chunked[name], everything[name], rtol=1e-12, atol=1e-14, msg=name)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match=r"max_factor_bytes must be a positive int \(bytes\)"):
            curvature.compute(logits, "exact", max_factor_bytes=bad)


def test_pairs_path_counts_the_float32_copy_of_half_precision_factors(monkeypatch):
    """With train-mode BatchNorm and a bfloat16 model, each layer's factors are summed in float32:
    max_factor_bytes bounds the factors of a pass together with that copy."""
    torch.manual_seed(5)
    model = _Net().bfloat16().train()
    x = torch.randn(3, 2, 9, 9, dtype=torch.bfloat16)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    per_factor = sum(r.output.numel() * r.output.element_size() for r in curvature.records)
    widest_copy = max(r.output.numel() * 4 for r in curvature.records)
    passes = _count_backward_passes(monkeypatch)
    bound = 3 * per_factor  # three factors would fit if only their bfloat16 bytes counted
    blocks = curvature.compute(logits, "exact", max_factor_bytes=bound, couples_examples=True)
    monkeypatch.undo()
    assert max(passes) * (per_factor + widest_copy) <= bound and max(passes) < 3, passes
    assert sum(passes) == logits.shape[0] * 4
    assert all(b.dtype == torch.float32 and bool(torch.isfinite(b).all()) for b in blocks.values())


def test_selected_layers_are_checked():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), Switch(), nn.Linear(3, 2))
    # an unsupported layer left out of the selection is fine: the factors pass through it
    with GGNBlocks(model, layers=[model[2], "3"]) as curvature:
        blocks = curvature.compute(model(torch.randn(4, 3)))
    assert sorted(blocks) == ["2", "3"]
    with pytest.raises(TypeError, match=r"layer '1' \(LayerNorm\) is not supported.*leave it out of `layers`"):
        GGNBlocks(model, layers=["1"])
    with pytest.raises(TypeError, match=r"layer '' \(Sequential\) is not supported"):
        GGNBlocks(model, layers=[model])
    with pytest.raises(ValueError, match=r"no module named 'head'"):
        GGNBlocks(model, layers=["head"])
    with pytest.raises(ValueError, match=r"is not a module of the model"):
        GGNBlocks(model, layers=[nn.Linear(3, 3)])
    with pytest.raises(ValueError, match=r"layers is empty"):
        GGNBlocks(model, layers=[])
    with pytest.raises(TypeError, match=r"iterable of modules or names, got a single Linear"):
        GGNBlocks(model, layers=model[0])
    with pytest.raises(TypeError, match=r"must hold modules or names, got int"):
        GGNBlocks(model, layers=[0])


def test_diagonal_matches_backpack_diag_ggn_exact():
    """BackPACK (test-only dependency, installed with --no-deps: its torchvision requirement is not
    needed for these extensions) gives only the diagonal; ours must agree with it."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    ).double()
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    extended = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(DiagGGNExact()):
        loss(extended(x), y).backward()
    with GGNBlocks(model) as curvature:
        logits = model(x)
    blocks = curvature.compute(logits, "exact")
    diagonals = curvature.compute(logits, "exact", diagonal=True)
    for index in ("0", "2", "5"):
        layer = extended[int(index)]
        diagonal = blocks[index].diagonal(dim1=1, dim2=2)  # [C_out, D + 1]
        torch.testing.assert_close(diagonals[index], diagonal)
        torch.testing.assert_close(diagonal[:, :-1].reshape(layer.weight.shape), layer.weight.diag_ggn_exact, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(diagonal[:, -1], layer.bias.diag_ggn_exact, rtol=1e-8, atol=1e-12)


def test_blocks_through_a_bnas_fast_op_in_the_graph():
    """A library op between layers (here `mix`) leaves the blocks unchanged: the same network with
    the plain-PyTorch sum gives the same blocks (whether the batched backward or the per-factor
    loop served it)."""

    class Net(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.a, self.b, self.head, self.fused = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3), fused

        def forward(self, x):
            ys = [self.a(x), self.b(x)]
            w = torch.tensor([0.3, 0.7], dtype=x.dtype).expand(x.shape[0], 2)
            h = bnas_fast.mix(ys, w) if self.fused else 0.3 * ys[0] + 0.7 * ys[1]
            return self.head(torch.tanh(h))

    torch.manual_seed(0)
    fused, plain = Net(True).double(), Net(False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64)
    results = []
    for model in (fused, plain):
        with GGNBlocks(model) as curvature:
            logits = model(x)
        results.append(curvature.compute(logits))
    assert set(results[0]) == {"a", "b", "head"}
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Any model: brute force from the Jacobian's rows, one autograd pass per (example, class)
# ----------------------------------------------------------------------------------------------


def _parameter_rows(module: nn.Module):
    """The parameters of ``module`` as [rows, D'] in the layout of its blocks."""
    if isinstance(module, Switch):
        return [module.weight.reshape(1, 1)]
    rows = module.weight.shape[0]
    columns = [module.weight.reshape(rows, -1)]
    if getattr(module, "bias", None) is not None:
        columns.append(module.bias.reshape(rows, 1))
    return columns


def _brute_force_by_rows(model: nn.Module, x: torch.Tensor, names):
    """{name: blocks} of the named layers: J^T (diag(p) - p p^T) J summed over examples, with the
    Jacobian's rows d logits[n, c] / d theta from plain autograd through the whole batch (so batch
    statistics, in-place operations and custom ops are all differentiated as they run)."""
    modules = dict(model.named_modules())
    logits = model(x)
    N, C = logits.shape
    prob = torch.softmax(logits.detach(), -1)
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    params = [p for name in names for p in (modules[name].weight, getattr(modules[name], "bias", None)) if p is not None]
    rows = [[torch.autograd.grad(logits[n, c], params, retain_graph=True, allow_unused=True) for c in range(C)] for n in range(N)]
    out = {}
    for name in names:
        module = modules[name]
        weight_index = next(i for i, p in enumerate(params) if p is module.weight)
        jac = []
        for n in range(N):
            per_class = []
            for c in range(C):
                grads = rows[n][c]
                w = grads[weight_index] if grads[weight_index] is not None else torch.zeros_like(module.weight)
                columns = [w.reshape(1, 1) if isinstance(module, Switch) else w.reshape(w.shape[0], -1)]
                if getattr(module, "bias", None) is not None:
                    b = grads[weight_index + 1]
                    columns.append((b if b is not None else torch.zeros_like(module.bias)).reshape(-1, 1))
                per_class.append(torch.cat(columns, 1))
            jac.append(torch.stack(per_class))
        J = torch.stack(jac)  # [N, C, rows, D']
        out[name] = torch.einsum("ncod,nce,neof->odf", J, H, J)
    return out


def _assert_blocks_match_brute_force(model, x, names, batch_norm_path="pairs", **compute_kwargs):
    expected = _brute_force_by_rows(model, x, names)
    with GGNBlocks(model, layers=names, batch_norm_path=batch_norm_path) as curvature:
        logits = model(x)
    got = curvature.compute(logits, "exact", **compute_kwargs)
    diagonals = curvature.compute(logits, "exact", diagonal=True, **compute_kwargs)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(diagonals[name], expected[name].diagonal(dim1=1, dim2=2), rtol=1e-8, atol=1e-12, msg=name)


def test_linear_on_sequences_sums_each_examples_positions_before_the_gram():
    """A Linear layer on [N, T, F] (or [N, A, B, F]): example n's weight gradient is the sum over its
    positions, so its block is (sum_t j_t)(sum_t j_t)^T, not sum_t j_t j_t^T."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(3, 4), nn.Linear(4, 5)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x)).mean(dim=tuple(range(1, x.dim() - 1))))

    torch.manual_seed(0)
    model = Net().double()
    for shape in ((4, 6, 3), (3, 2, 5, 3)):
        _assert_blocks_match_brute_force(model, torch.randn(*shape, dtype=torch.float64), ["inner", "head"])
    # the smallest case, by hand: positions that cancel leave the logits independent of the weight
    tiny = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        tiny.weight.copy_(torch.tensor([[1.0], [2.0]]))
    with GGNBlocks(tiny) as curvature:
        logits = tiny(torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)).sum(1)
    assert torch.equal(curvature.compute(logits)["Linear"], torch.zeros(2, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
def test_in_place_operations_after_a_layer_leave_its_factors_alone(train):
    """ReLU(inplace=True) after a layer and ``out += identity`` (a residual block) change the tensor
    the layer returned; the factors must still be taken at the layer's output."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.relu = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=True)
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            out = self.norm(self.conv(x))
            out += x
            out = self.relu(out)
            return self.head(out.mean((2, 3)))

    torch.manual_seed(1)
    model = Block().double().train(train)
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    _assert_blocks_match_brute_force(model, torch.randn(4, 2, 5, 5, dtype=torch.float64), ["conv", "norm", "head"])


def test_an_input_changed_in_place_after_its_layer_ran_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)  # after b ran: b's recorded input is no longer what it saw
            return out + h[:, :2]

    model = Net()
    with GGNBlocks(model) as curvature:
        logits = model(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"the input of layer 'b' was modified in place after the layer ran"):
        curvature.compute(logits)


class _Center(nn.Module):
    """x - x.mean(0): mixes examples without any batch norm."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class _FunctionalBatchNorm(nn.Module):
    def forward(self, x):
        return nn.functional.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("mixer", ["center", "functional-bn", "ghost-plain", "ghost-fused"])
def test_examples_mixed_by_other_operations_are_detected(mixer):
    """Batch statistics outside nn.BatchNorm (a parameter-free module, F.batch_norm, bnas_fast's
    ghost batch norm in both forms) couple the examples too: found from the autograd graph or by
    the probe, the blocks still equal brute force."""
    from bnas_fast.nn.oneshot import GhostBatchNorm2d

    torch.manual_seed(2)
    mix = {"center": _Center(), "functional-bn": _FunctionalBatchNorm(),
           "ghost-plain": GhostBatchNorm2d(3, 2, fused=False), "ghost-fused": GhostBatchNorm2d(3, 2, fused=True)}[mixer]
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), mix, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 4)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    _assert_blocks_match_brute_force(model, x, ["0", "5"])
    with GGNBlocks(model, layers=["0", "5"]) as curvature:
        logits = model(x)
    wrong = curvature.compute(logits, couples_examples=False)  # the per-example path, forced: not the same
    assert not torch.allclose(wrong["0"], _brute_force_by_rows(model, x, ["0"])["0"])
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="couples_examples must be None, True or False"):
            curvature.compute(logits, couples_examples=bad)
    with pytest.raises(TypeError, match="diagonal must be a bool"):
        curvature.compute(logits, diagonal=1)


class _Roll(nn.Module):
    """x + x rolled by one example: example n mixes with example n - 1 only."""

    def forward(self, x):
        return x + torch.roll(x, 1, dims=0)


@pytest.mark.parametrize("batch", [2, 3, 6])
def test_the_probe_finds_coupling_between_neighbouring_examples(batch):
    """The probe's cotangent sits on one example (the second; the first with two or three); a mixing of
    neighbours carries it to the example next to it, at every batch size, so the blocks go
    through the exact (coupled) path and equal brute force."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _Roll(), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 4)).double()
    x = torch.randn(batch, 2, 5, 5, dtype=torch.float64)
    _assert_blocks_match_brute_force(model, x, ["0", "5"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_every_kind_of_non_finite_value(dtype):
    """bnas_fast._checks.all_finite (the curvature's input checks): NaN, +inf and -inf anywhere,
    the largest finite value, an empty tensor."""
    from bnas_fast._checks import all_finite

    x = torch.randn(3, 4, 5).to(dtype)
    assert all_finite(x)
    assert all_finite(torch.full((2, 2), torch.finfo(dtype).max, dtype=dtype))
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0, 0), (1, 2, 3), (2, 3, 4)):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
            assert not all_finite(y.transpose(0, 2)), (bad, where)  # a non-contiguous view


def test_the_probe_finds_no_coupling_in_a_per_example_network(monkeypatch):
    """Eval-mode BatchNorm: the probe rides along with the K factors in one batched pass (one
    cotangent more) and finds nothing."""
    torch.manual_seed(3)
    model = _Net().double().eval()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    passes = _count_backward_passes(monkeypatch)
    with GGNBlocks(model, rank_one_backward=False) as curvature:
        logits = model(x)
    curvature.compute(logits)
    assert passes == [5]  # the C - 1 = 4 factors and the probe, in one batched pass
    passes.clear()
    with GGNBlocks(model) as curvature:
        logits = model(x)
    curvature.compute(logits)
    # the route's cut at conv2: the pass splits there (the factors are not of rank one, so
    # autograd crosses conv2), and the probe rides through both halves
    assert passes == [5, 5] and curvature.last_route is None


def test_train_mode_batch_norm_with_a_custom_op_in_the_graph():
    """The coupled path falls back to one pass per cotangent when vmap has no rule for an op."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.norm, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

        def forward(self, x):
            w = torch.tensor([0.4, 0.6], dtype=x.dtype).expand(x.shape[0], 2)
            return self.head(torch.tanh(self.norm(bnas_fast.mix([self.a(x), self.b(x)], w))))

    torch.manual_seed(4)
    _assert_blocks_match_brute_force(Net().double().train(), torch.randn(5, 3, dtype=torch.float64), ["a", "b", "norm", "head"])


def test_frozen_layers_and_keyword_calls_get_their_blocks():
    """A frozen first layer (nothing before it needs a gradient) and a layer called as
    ``layer(input=x)`` get the same blocks as otherwise."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(input=torch.tanh(self.first(x)))

    torch.manual_seed(5)
    model, x = Net().double(), torch.randn(5, 3, dtype=torch.float64)
    expected = _brute_force_by_rows(model, x, ["first", "head"])
    model.first.requires_grad_(False)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    got = curvature.compute(logits)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12)


def test_context_misuse_and_parameterless_batch_norm_raise():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"layer '1' \(BatchNorm1d\) has no affine parameters"):
        GGNBlocks(model, layers=["0", "1"])
    curvature = GGNBlocks(model)
    with curvature:
        with pytest.raises(RuntimeError, match="already entered"):
            curvature.__enter__()
    with curvature:  # usable again after the error
        logits = model(torch.randn(4, 3))
    assert set(curvature.compute(logits)) == {"0", "2"}


def test_switch_blocks_accumulate_in_float32_for_low_precision_models():
    model = nn.Sequential(nn.Linear(3, 4), Switch(0.5), nn.Linear(4, 2)).to(torch.bfloat16)
    with GGNBlocks(model) as curvature:
        logits = model(torch.randn(6, 3, dtype=torch.bfloat16))
    blocks = curvature.compute(logits)
    assert {b.dtype for b in blocks.values()} == {torch.float32}


@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
def test_string_paddings_give_the_blocks_of_the_explicit_padding(train):
    """padding="valid" is padding 0; "same" (stride 1, even total padding) is dilation (k - 1) / 2 per side."""
    from bnas_fast.curvature import diagonal_recursion_hessians

    torch.manual_seed(6)
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    results = []
    for same, valid in (("same", "valid"), ((2, 1), 0)):
        torch.manual_seed(7)
        model = nn.Sequential(nn.Conv2d(2, 3, (5, 3), padding=same, dilation=(1, 1)), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Conv2d(3, 4, 3, padding=valid), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double().train(train)
        with GGNBlocks(model) as curvature:
            logits = model(x)
        results.append(curvature.compute(logits))
        if not train:
            results[-1]["recursion"] = diagonal_recursion_hessians(model, x)["0"]
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-12, atol=1e-12, msg=name)


class _ThreeNorms(nn.Module):
    """Grouped convolutions, BatchNorm2d twice and BatchNorm1d once in train mode (each later
    BatchNorm's statistics depend on the earlier ones'), a Switch, and a Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        )
        self.gate = Switch(0.7)
        self.fc = nn.Linear(36, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(self.gate(self.features(x))))))


@pytest.mark.parametrize("factors_per_pass", [None, 1, 4])
def test_batch_norm_statistics_as_leaves_give_the_exact_blocks(factors_per_pass):
    """batch_norm_path="statistics" (the O(N) path): the blocks and diagonals of every layer equal
    the float64 brute force through the true coupled graph, also with the factors and the basis
    cotangents back-propagated in chunks."""
    torch.manual_seed(0)
    model = _ThreeNorms().double().train()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    names = ["features.0", "features.1", "features.3", "features.4", "gate", "fc", "norm", "head"]
    kwargs = {}
    if factors_per_pass is not None:
        with GGNBlocks(model) as probe:
            model(x)
        kwargs["max_factor_bytes"] = factors_per_pass * sum(r.output.numel() * 8 for r in probe.records)
    _assert_blocks_match_brute_force(model, x, names, batch_norm_path="statistics", couples_examples=False, **kwargs)
    _assert_blocks_match_brute_force(model, x, ["features.3", "norm"], batch_norm_path="statistics")  # a subset


def test_batch_norm_statistics_path_keeps_float32_accuracy():
    """float32 blocks of the statistics path stay within 5e-6 (relative to the largest entry) of
    its float64 ones, as the pairs path's do (up to 2e-6 on this network at 28x28). The
    frozen-statistics rows and their correction cancel to about a tenth of their size, so the
    path sums and corrects them in double."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).train()
    x = torch.randn(32, 1, 14, 14)
    results = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        with GGNBlocks(m, batch_norm_path="statistics") as curvature:
            logits = m(x.to(dtype))
        results.append(curvature.compute(logits, "exact", couples_examples=False))
    for name, truth in results[1].items():
        error = float((results[0][name].double() - truth).abs().max() / truth.abs().max())
        assert error < 5e-6, (name, error)


def test_batch_norm_statistics_path_leaves_the_model_as_it_runs():
    """The leaf statistics have the batch statistics' values: the logits are the model's, the
    running statistics move once per forward pass, and eval mode takes the usual path."""
    torch.manual_seed(0)
    model = _ThreeNorms().double().train()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    with GGNBlocks(model, batch_norm_path="statistics") as curvature:
        logits = model(x)
    torch.testing.assert_close(logits, twin(x), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    model.eval()
    with GGNBlocks(model, batch_norm_path="statistics") as curvature:
        logits = model(x)
    assert curvature._norm_order == []
    eval_blocks = curvature.compute(logits, "exact")
    with GGNBlocks(model) as curvature:
        logits = model(x)
    for name, expected in curvature.compute(logits, "exact").items():
        torch.testing.assert_close(eval_blocks[name], expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mixer", ["center", "arch_batch_norm"])
def test_batch_norm_statistics_path_refuses_other_couplings(mixer):
    torch.manual_seed(0)
    other = _Center() if mixer == "center" else bnas_fast.nn.ArchBatchNorm2d(3, affine=False)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), other, nn.Flatten(), nn.Linear(12, 3)).double()
    with GGNBlocks(model, batch_norm_path="statistics") as curvature:
        logits = model(torch.randn(4, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="something besides nn.BatchNorm couples the examples.*batch_norm_path='pairs'"):
        curvature.compute(logits, "exact")
    with pytest.raises(ValueError, match="couples_examples=True asks for the \\(example, factor\\) pairs"):
        curvature.compute(logits, "exact", couples_examples=True)


class _ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 3


class _StandardisedConv2d(nn.Conv2d):
    """A weight-standardised convolution (timm's StdConv2d pattern)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ConvForwardConv2d(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class _LoRALinear(nn.Linear):
    """Parameters besides weight and bias, used through F.linear's weight (forward inherited)."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.A, self.B = nn.Parameter(torch.randn(2, i)), nn.Parameter(torch.zeros(o, 2))


class _ScaledSwitch(Switch):
    def forward(self, x):
        return 2 * self.weight * x


class _TaggedConv2d(nn.Conv2d):
    """A subclass that computes what Conv2d does: accepted."""

    tag = "stem"


@pytest.mark.parametrize("layer", [_ScaledBatchNorm(3), _StandardisedConv2d(3, 3, 1), _ConvForwardConv2d(3, 3, 1),
                                   _LoRALinear(48, 3), _ScaledSwitch()], ids=lambda m: type(m).__name__)
def test_subclasses_that_compute_something_else_are_refused(layer):
    """A supported layer's subclass that overrides forward (or Conv2d's _conv_forward) or holds
    parameters besides weight and bias would get the blocks of the plain layer: wrong, silently.
    It raises TypeError naming the layer when the context is made, with or without ``layers``."""
    model = nn.Sequential(nn.Conv2d(1, 3, 1), layer, nn.Flatten(), nn.Linear(3, 3))  # made, never run
    for layers in (None, ["0", "1"]):
        with pytest.raises(TypeError, match=f"layer '1' \\({type(layer).__name__}, a \\w+\\) (overrides|has parameters)"):
            GGNBlocks(model, layers=layers)


def test_a_subclass_that_computes_what_its_class_does_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(_TaggedConv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    _assert_blocks_match_brute_force(model, torch.randn(4, 2, 4, 4, dtype=torch.float64), ["0", "3"])


@pytest.mark.parametrize("change", ["values", "dtype"])
def test_batch_norm_statistics_path_refuses_a_batch_norm_that_returns_something_else(change):
    """The leaves stand for a plain BatchNorm: an earlier forward hook that changes the output
    (values, or dtype) would otherwise get wrong blocks silently (a subclass that overrides
    forward is refused before, test_subclasses_that_compute_something_else_are_refused). The
    refused pass leaves every BatchNorm's running statistics as they were, the earlier
    BatchNorm's too."""
    norm = nn.BatchNorm2d(3)
    norm.register_forward_hook((lambda module, args, out: out * 2) if change == "values" else
                               (lambda module, args, out: out.double()))
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), norm, nn.Flatten(), nn.Linear(48, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="BatchNorm '2' .* returned something other than BatchNorm of its input"):
        with GGNBlocks(model, batch_norm_path="statistics"):
            model(torch.randn(4, 1, 4, 4) + 5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    model[:3](torch.randn(4, 1, 4, 4) + 5)  # outside the context the modules update them as usual
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert int(norm.num_batches_tracked) == 1


def test_instance_norm_does_not_count_as_coupling_and_modes_are_recorded_when_layers_run():
    """InstanceNorm normalises each example by itself (batch_norm on a batch of one): the
    statistics path takes it, and so does the probe-free per-example path. A BatchNorm's mode is
    the one it ran in, even if the model is switched to eval before compute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(12, 3)).double().train()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    _assert_blocks_match_brute_force(model, x, ["0", "2", "5"], batch_norm_path="statistics")
    eval_model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3), nn.Flatten(), nn.Linear(12, 3)).double()
    with GGNBlocks(eval_model) as curvature:
        logits = eval_model(x)
    from bnas_fast.curvature import _graph_nodes, _has_batch_statistics
    assert not _has_batch_statistics(_graph_nodes(logits.grad_fn))
    expected = _brute_force_by_rows(model, x, ["0", "2", "5"])
    with GGNBlocks(model, layers=["0", "2", "5"], batch_norm_path="statistics") as curvature:
        logits = model(x)
    model.eval()  # after the forward pass: the blocks are those of the pass that ran
    got = curvature.compute(logits, "exact")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)


def test_two_statistics_contexts_cannot_share_a_batch_norm():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with GGNBlocks(model, batch_norm_path="statistics"):
        with pytest.raises(RuntimeError, match="already under another entered GGNBlocks"):
            with GGNBlocks(model, batch_norm_path="statistics"):
                pass
        with GGNBlocks(model):  # the pairs path adds no leaves: allowed
            pass
    with GGNBlocks(model, batch_norm_path="statistics"):  # released on exit
        model(torch.randn(4, 2))


def test_batch_norm_statistics_path_misuse_raises():
    with pytest.raises(ValueError, match="batch_norm_path must be one of \\('pairs', 'statistics'\\), got 'leaves'"):
        GGNBlocks(nn.Linear(2, 2), batch_norm_path="leaves")
    norm = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(2, 3), norm, norm, nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="BatchNorm '1' ran more than once inside the context \\(shared"):
        with GGNBlocks(model, batch_norm_path="statistics"):
            model(torch.randn(4, 2))
    # both of the refused pass's updates are put back
    assert int(norm.num_batches_tracked) == 0 and torch.equal(norm.running_mean, torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# The rank-one route (GGNBlocks(rank_one_backward=True), the default): bnas_fast.rank_one_split
# and rank_one_conv_input_grad carry the factors across the last convolution
# ----------------------------------------------------------------------------------------------


class _Classifier(nn.Module):
    """Issue 6's shape in small: convolutions, then a global average pool and a Linear head, so the
    last convolution's factors are of rank one per (example, channel). ``skip`` adds its input back
    after it (a residual: a path around it); ``mixer`` runs between the first two convolutions."""

    def __init__(self, skip: bool = False, mixer: nn.Module = None, classes: int = 9):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.mixer = mixer if mixer is not None else nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, classes)  # 8 exact factors by default: passes of 4 and more take the route
        self.skip = skip

    def forward(self, x):
        h = self.mixer(torch.relu(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h) + h) if self.skip else torch.relu(self.conv3(h))
        return self.head(h.mean((2, 3)))


_CLASSIFIER_LAYERS = ["conv1", "conv2", "conv3", "head"]


@pytest.mark.parametrize("factors_per_pass, couples_examples", [(None, None), (4, None), (4, False)],
                         ids=["one-pass-probed", "chunks-probed", "chunks-unprobed"])
def test_rank_one_route_gives_the_brute_force_blocks(factors_per_pass, couples_examples):
    torch.manual_seed(3)
    model = _Classifier().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    expected = _brute_force_by_rows(model, x, _CLASSIFIER_LAYERS)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    per_factor = sum(r.output.numel() * 8 for r in curvature.records)
    kwargs = {} if factors_per_pass is None else dict(max_factor_bytes=factors_per_pass * per_factor)
    got = curvature.compute(logits, "exact", couples_examples=couples_examples, **kwargs)
    assert curvature.last_route == "conv3"
    diagonals = curvature.compute(logits, "exact", diagonal=True, couples_examples=couples_examples, **kwargs)
    assert curvature.last_route == "conv3"
    for name in _CLASSIFIER_LAYERS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(diagonals[name], expected[name].diagonal(dim1=1, dim2=2), rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("min_cotangents", [1, GGNBlocks.RANK_ONE_MIN_COTANGENTS])
def test_rank_one_route_and_autograd_give_the_same_monte_carlo_blocks(min_cotangents, monkeypatch):
    """Monte Carlo mode's pass holds 2 cotangents (the sampled factor and the probe): below the
    route's minimum, so autograd; with the minimum lowered to 1 the route runs, and agrees."""
    monkeypatch.setattr(GGNBlocks, "RANK_ONE_MIN_COTANGENTS", min_cotangents)
    torch.manual_seed(4)
    model = _Classifier().double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    results = []
    for route in (True, False):
        with GGNBlocks(model, rank_one_backward=route) as curvature:
            logits = model(x)
        results.append(curvature.compute(logits, "mc", torch.Generator().manual_seed(5)))
        assert curvature.last_route == ("conv3" if route and min_cotangents == 1 else None)
    for name in _CLASSIFIER_LAYERS:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-10, atol=1e-13, msg=name)


def test_rank_one_route_is_not_taken_around_a_skip_connection(monkeypatch):
    """conv3's input also reaches the logits around it: the route may not start there. conv2's
    input reaches them only through conv2, but its factors are not of rank one (conv3 mixes
    positions): the split says so, and autograd crosses conv2. The blocks stay exact."""
    torch.manual_seed(5)
    model = _Classifier(skip=True).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    expected = _brute_force_by_rows(model, x, _CLASSIFIER_LAYERS)
    splits = []
    split = bnas_fast.curvature.rank_one_split
    monkeypatch.setattr(bnas_fast.curvature, "rank_one_split", lambda f: splits.append(f.shape) or split(f))
    with GGNBlocks(model) as curvature:
        logits = model(x)
    assert curvature._rank_one_cut(logits)[0].name == "conv2"
    per_factor = sum(r.output.numel() * 8 for r in curvature.records)
    got = curvature.compute(logits, "exact", max_factor_bytes=4 * per_factor)  # passes of 4 + the probe, and 4
    assert curvature.last_route is None
    assert splits == [(5, 3, 4, 6, 6)]  # tried on the first pass only
    for name in _CLASSIFIER_LAYERS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("where", ["before", "after"])
def test_rank_one_route_leaves_coupling_to_the_probe(where):
    """Examples mixed before the cut convolution (the probe's cotangent reaches the mixer through
    the rank-one route) or after it (it reaches the cut itself): both found, blocks exact."""
    torch.manual_seed(6)
    model = _Classifier(mixer=_Center() if where == "before" else None).double()
    if where == "after":
        model.head = nn.Sequential(_Center(), nn.Linear(4, 5)).double()
        names = ["conv1", "conv2", "conv3", "head.1"]
    else:
        names = _CLASSIFIER_LAYERS
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    expected = _brute_force_by_rows(model, x, names)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    got = curvature.compute(logits, "exact")
    assert curvature.last_route is None
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)


def test_rank_one_route_off_and_misuse():
    model = _Classifier()
    with GGNBlocks(model, rank_one_backward=False) as curvature:
        logits = model(torch.randn(2, 2, 6, 6))
    assert curvature._rank_one_cut(logits) is None
    curvature.compute(logits)
    assert curvature.last_route is None
    with pytest.raises(TypeError, match="rank_one_backward must be a bool, got 1"):
        GGNBlocks(model, rank_one_backward=1)
    with GGNBlocks(model) as curvature:
        logits = model(torch.randn(2, 2, 6, 6))
    curvature.compute(logits)
    assert curvature.last_route == "conv3"
    curvature.compute(logits, couples_examples=True)  # the pairs path: no route, and last_route says so
    assert curvature.last_route is None
    # bfloat16 models keep autograd all the way (the rank-one ops take float32 and float64)
    half = _Classifier().to(torch.bfloat16)
    with GGNBlocks(half) as curvature:
        logits = half(torch.randn(2, 2, 6, 6, dtype=torch.bfloat16))
    assert curvature._rank_one_cut(logits) is None


def test_rank_one_route_checks_the_weight_as_autograd_does():
    """The route reads the weight the convolution saved: changed in place after the forward pass,
    it raises as autograd's own backward does (review of 2026-12-02), instead of using the new one."""
    model = _Classifier().double()
    for route in (True, False):
        with GGNBlocks(model, rank_one_backward=route) as curvature:
            logits = model(torch.randn(2, 2, 6, 6, dtype=torch.float64))
        with torch.no_grad():
            model.conv3.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            curvature.compute(logits)


class _ComputedWeight(_Classifier):
    """conv3's weight is computed from an activation before it (set as a plain tensor attribute
    in every forward pass), so factors reach conv1 through the weight as well."""

    def forward(self, x):
        h1 = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h1))
        self.conv3.weight = self.base_weight * (1 + h1.mean())
        return self.head(torch.relu(self.conv3(h)).mean((2, 3)))


def test_rank_one_route_is_not_taken_through_a_computed_weight():
    """A weight computed in the graph carries factors around the cut (review of 2026-12-02): the
    route is refused there, and the blocks of the layers before it stay exact."""
    torch.manual_seed(7)
    model = _ComputedWeight().double()
    model.base_weight = nn.Parameter(model.conv3.weight.detach().clone())
    del model.conv3.weight
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    names = ["conv1", "conv2", "conv3", "head"]
    expected = _brute_force_by_rows(model, x, ["conv1", "conv2", "head"])
    with GGNBlocks(model, layers=names) as curvature:
        logits = model(x)
    got = curvature.compute(logits)
    assert curvature.last_route is None
    for name in ("conv1", "conv2", "head"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)


class _Flip(nn.Module):
    """Mixup with the batch reversed: example n mixes with example N - 1 - n."""

    def forward(self, x):
        return 0.7 * x + 0.3 * x.flip(0)


@pytest.mark.parametrize("batch", [2, 3, 4, 5, 6])
def test_the_probe_finds_flip_mixup(batch):
    """x.flip(0) pairs the first and last examples: a probe on those two (the earlier probe) saw
    nothing. The probe on one example catches it (at N = 3 the first: flip leaves the second in
    place), and the blocks equal brute force."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _Flip(), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 4)).double()
    _assert_blocks_match_brute_force(model, torch.randn(batch, 2, 5, 5, dtype=torch.float64), ["0", "5"])


class _Siamese(nn.Module):
    """Both views of each example through one encoder, as one batch of 2 N rows."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x):
        codes = self.encoder(torch.cat([x, x.flip(1)]))  # [2 N, 3]
        return self.head(torch.cat(codes.chunk(2), 1))


class _SequenceFirst(nn.Module):
    """A Linear on a sequence-first [T, N, F] tensor (the default layout of nn.RNN and nn.Transformer)."""

    def __init__(self):
        super().__init__()
        self.step, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):  # x [N, T, F]
        return self.head(self.step(x.transpose(0, 1)).sum(0))


class _Prototypes(nn.Module):
    """A Linear applied to class prototypes (not per example), then compared with each example."""

    def __init__(self):
        super().__init__()
        self.codes, self.embed = nn.Parameter(torch.randn(5, 4)), nn.Linear(4, 4)

    def forward(self, x):
        return x @ self.embed(self.codes).t()


@pytest.mark.parametrize("make, x", [
    (_Siamese, torch.randn(3, 4)),
    (_SequenceFirst, torch.randn(3, 2, 4)),
    (_SequenceFirst, torch.randn(1, 2, 4)),  # N = 1: no probe to catch it
    (_Prototypes, torch.randn(3, 4)),
    (lambda: nn.Sequential(nn.Linear(4, 3)), torch.randn(4)),  # unbatched
], ids=["siamese", "sequence-first", "sequence-first-N1", "prototypes", "unbatched"])
def test_a_layer_that_does_not_run_on_the_examples_raises(make, x):
    """Every recorded layer must run on the logits' N examples along its first dimension: the
    blocks sum per-example products over it. A layer on a folded batch, a sequence-first tensor,
    class prototypes or one unbatched example raises, naming the layer, with or without the probe."""
    model = make()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for couples_examples in (None, False):
        with GGNBlocks(model, layers=names) as curvature:
            logits = model(x)
            if logits.dim() == 1:
                logits = logits[None]
        with pytest.raises(ValueError, match="GGNBlocks.compute: layer '.*' \\(Linear\\) ran on "):
            curvature.compute(logits, couples_examples=couples_examples)


class _GatedSum(nn.Module):
    """A Switch on a [N] tensor: one gate value per example."""

    def __init__(self):
        super().__init__()
        self.features, self.gate, self.head = nn.Linear(4, 3), Switch(0.7), nn.Linear(1, 3)

    def forward(self, x):
        return self.head(self.gate(torch.tanh(self.features(x)).sum(1))[:, None])


def test_a_switch_on_one_value_per_example():
    """A Switch may gate a [N] tensor ([N, *] in general): its H_s equals brute force (the review
    of 2026-12-02 found that a 1-D input crashed)."""
    torch.manual_seed(6)
    model = _GatedSum().double()
    _assert_blocks_match_brute_force(model, torch.randn(5, 4, dtype=torch.float64), ["features", "gate", "head"])


@pytest.mark.filterwarnings("ignore:.*is deprecated in favor of:FutureWarning")
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_the_older_weight_norm_hooks_give_the_blocks_of_the_computed_weight(norm):
    """torch.nn.utils.weight_norm and spectral_norm (the hook-based ones) replace the weight by
    parameters it is computed from before each forward pass; the layer still computes a plain
    Linear / Conv2d, so it is accepted, and its blocks equal those of a plain layer holding the
    computed weight."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    wrapped = copy.deepcopy(model)
    for i in (0, 3):
        getattr(torch.nn.utils, norm)(wrapped[i])
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    with GGNBlocks(wrapped) as curvature:
        logits = wrapped(x)
    got = curvature.compute(logits)
    with torch.no_grad():
        for i in (0, 3):
            model[i].weight.copy_(wrapped[i].weight)
    with GGNBlocks(model) as curvature:
        logits = model(x)
    expected = curvature.compute(logits)
    for name in ("0", "3"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_forward_replaced_on_the_instance_is_refused():
    layer = nn.Linear(3, 2)
    layer.forward = lambda x: F.linear(x, layer.weight.square(), layer.bias)
    with pytest.raises(TypeError, match=r"layer '0' \(Linear, a Linear\) overrides forward \(on the instance\)"):
        GGNBlocks(nn.Sequential(layer))


class _Tied(nn.Module):
    def __init__(self, reuse):
        super().__init__()
        self.a, self.b, self.reuse = nn.Linear(3, 3), nn.Linear(3, 2), reuse
        if reuse == "tied":
            self.c = nn.Linear(3, 3)
            self.c.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reuse == "tied":
            h = torch.tanh(self.c(h))
        elif self.reuse == "functional":
            h = torch.tanh(F.linear(h, self.a.weight))
        return self.b(h)


@pytest.mark.parametrize("reuse", ["tied", "functional"])
def test_shared_weights_raise(reuse):
    """Tied weights (two layers, one parameter) or a layer's weight used again outside it: the
    blocks of a shared parameter are not what GGNBlocks computes, so compute raises."""
    model = _Tied(reuse)
    with GGNBlocks(model) as curvature:
        logits = model(torch.randn(4, 3))
    with pytest.raises(ValueError, match="tied weights|is used 2 times in the forward pass"):
        curvature.compute(logits)
    if reuse == "tied":
        # frozen, and with only one of the two layers recorded: no gradient edges to count, the
        # tie is found by identity over the whole model
        frozen = _Tied(reuse).requires_grad_(False)
        frozen.a.bias.requires_grad_(True)
        with GGNBlocks(frozen, layers=["c"]) as curvature:
            logits = frozen(torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"the weight of layer 'c' is one parameter under the names \['a.weight', 'c.weight'\]"):
            curvature.compute(logits)


def test_a_tie_through_a_parametrization_is_found():
    """b's weight computed from a's weight (``b.parametrizations.weight.original = a.weight``)."""
    from torch.nn.utils import parametrize

    model = _Tied("none")
    model.c = nn.Linear(3, 3)
    parametrize.register_parametrization(model.c, "weight", nn.Identity())
    model.c.parametrizations.weight.original = model.a.weight
    model.reuse = "tied"
    with GGNBlocks(model, layers=["c"]) as curvature:
        logits = model(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"the parametrizations.weight.original of layer 'c' is one parameter"):
        curvature.compute(logits)


def test_eval_batch_norm_whose_running_statistics_changed_since_it_ran_raises():
    """An eval-mode BatchNorm normalised with the running statistics of that moment; a training
    pass between the forward pass and compute changes them in place, and then autograd's own
    backward through the BatchNorm (which reads them without a version check) and its blocks
    would use the new values: compute raises. Unchanged, the blocks equal brute force."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    model.train()(torch.randn(8, 2, 4, 4, dtype=torch.float64) * 3 + 1)  # running statistics away from (0, 1)
    model.eval()
    _assert_blocks_match_brute_force(model, torch.randn(4, 2, 4, 4, dtype=torch.float64), ["0", "1", "4"])
    with GGNBlocks(model) as curvature:
        logits = model(torch.randn(4, 2, 4, 4, dtype=torch.float64))
    model.train()(torch.randn(8, 2, 4, 4, dtype=torch.float64) - 2)  # outside the context
    with pytest.raises(RuntimeError, match="running statistics of BatchNorm '1' changed after it ran in eval mode"):
        curvature.compute(logits, "exact")
