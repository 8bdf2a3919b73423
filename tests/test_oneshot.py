"""One-shot architecture search (seed 004): architectures as data, path-dropout masks, ghost batch
norm, the one-shot model (fused sparse execution against the plain masked model and against
stand-alone models with the same weights), batched candidate scoring and the method's loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bnas_fast.methods import oneshot
from bnas_fast.nn.mix import mix_modules
from bnas_fast.nn.oneshot import (
    OPERATIONS,
    Architecture,
    ChoiceBlock,
    GhostBatchNorm2d,
    OneShotNet,
    PathMasks,
    sample_path_dropout_masks,
)
from bnas_fast.sampling import PathDropoutSchedule

SMALL = dict(in_channels=1, num_classes=5, channels=4, num_blocks=3, cells_per_stage=1, num_stages=2, ghost_batch_size=4)


def _model(fused=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return OneShotNet(**{**SMALL, **kw}, fused=fused).to(dtype)


def _masks(batch, step=10, total=10, r=0.3, seed=0, ghost=4, num_blocks=3, dtype=torch.float64):
    m = sample_path_dropout_masks(batch, num_blocks, PathDropoutSchedule(r, total), step, ghost,
                                  generator=torch.Generator().manual_seed(seed))
    return PathMasks([t.to(dtype) for t in m.inputs], [t.to(dtype) for t in m.ops])


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------


def test_architecture_json_round_trip_and_normalisation():
    a = Architecture((ChoiceBlock((1, 0), ("max3", "sep3")), ChoiceBlock((2,), ("identity",))))
    assert a.blocks[0] == ChoiceBlock((0, 1), ("sep3", "max3"))  # sorted, operations in menu order
    b = Architecture.from_json(a.to_json())
    assert b == a and hash(b) == hash(a)
    assert json.loads(a.to_json())["blocks"][1] == {"inputs": [2], "ops": ["identity"]}
    assert Architecture.from_dict({"blocks": [{"inputs": [0], "ops": ["avg3"]}]}).blocks[0].ops == ("avg3",)


@pytest.mark.parametrize(
    "blocks, match",
    [
        ([ChoiceBlock((2,), ("sep3",))], r"blocks\[0\].inputs references input 2"),
        ([ChoiceBlock((0,), ("sep3",)), ChoiceBlock((4,), ("sep3",))], r"blocks\[1\].inputs references input 4"),
        ([ChoiceBlock((-1,), ("sep3",))], r"blocks\[0\].inputs references input -1"),
        ([ChoiceBlock((0,), ())], r"blocks\[0\].ops is empty"),
        ([ChoiceBlock((), ("sep3",))], r"blocks\[0\].inputs is empty"),
        ([ChoiceBlock((0,), ("conv9",))], r"blocks\[0\].ops has 'conv9'"),
        ([ChoiceBlock((0, 0), ("sep3",))], r"repeats an input"),
        ([ChoiceBlock((0,), ("sep3", "sep3"))], r"repeats an operation"),
        ([], r"at least one choice block"),
    ],
)
def test_architecture_bad_input(blocks, match):
    with pytest.raises(ValueError, match=match):
        Architecture(tuple(blocks))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: Architecture.sample(2, max_inputs=1.5), ValueError, r"Architecture.sample: max_inputs must be a positive int, got 1.5"),
        (lambda: Architecture.sample(2, max_ops=0), ValueError, r"Architecture.sample: max_ops must be a positive int, got 0"),
        (lambda: Architecture.sample(-1), ValueError, r"Architecture.sample: num_blocks must be a positive int, got -1"),
        (lambda: Architecture.sample(2, generator=5), TypeError, r"Architecture.sample: generator must be None or a torch.Generator"),
        (lambda: Architecture.all_on(2.5), ValueError, r"Architecture.all_on: num_blocks must be a positive int, got 2.5"),
        (lambda: Architecture.all_on(2).path_masks(-1), ValueError, r"Architecture.path_masks: batch_size must be an int >= 0, got -1"),
        (lambda: Architecture.all_on(2).path_masks(2.0), ValueError, r"Architecture.path_masks: batch_size must be an int >= 0, got 2.0"),
    ],
)
def test_architecture_bad_counts_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert Architecture.all_on(2).path_masks(0).ops[1].shape == (0, len(OPERATIONS))  # an empty batch is fine


def test_architecture_sample_is_reproducible_and_in_the_search_space():
    a = [Architecture.sample(4, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(0)
    archs = [Architecture.sample(4, gen) for _ in range(300)]
    assert len(set(archs)) > 250
    for arch in archs:
        for i, b in enumerate(arch.blocks):
            assert 1 <= len(b.inputs) <= 2 and all(0 <= k < 2 + i for k in b.inputs)
            assert 1 <= len(b.ops) <= 2
    # both sizes occur, and every operation and every input of the last block is drawn
    assert {len(b.ops) for a in archs for b in a.blocks} == {1, 2}
    assert {o for a in archs for b in a.blocks for o in b.ops} == set(OPERATIONS)
    assert {k for a in archs for k in a.blocks[3].inputs} == set(range(5))


def test_architecture_builds_a_stand_alone_model():
    a = Architecture((ChoiceBlock((0,), ("sep3",)), ChoiceBlock((0, 2), ("identity", "max3"))))
    model = a.build(channels=4, num_classes=3)
    assert isinstance(model.head_norm, torch.nn.BatchNorm2d) and model.arch == a
    blocks = model.layers[0].blocks
    assert list(blocks[0].inputs) == ["0"] and list(blocks[0].ops) == ["sep3"]
    assert list(blocks[1].inputs) == ["0", "2"] and list(blocks[1].ops) == ["identity", "max3"]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_path_masks_of_an_architecture():
    a = Architecture((ChoiceBlock((1,), ("sep5",)), ChoiceBlock((0, 2), ("identity", "avg3"))))
    m = a.path_masks(3)
    assert m.inputs[0].tolist() == [[0, 1]] * 3
    assert m.inputs[1].tolist() == [[1, 0, 1]] * 3
    assert m.ops[1].tolist() == [[1, 0, 0, 0, 0, 0, 1]] * 3


# ----------------------------------------------------------------------------------------------
# path dropout
# ----------------------------------------------------------------------------------------------


def test_path_dropout_masks_ghost_batches_schedule_and_rate():
    schedule = PathDropoutSchedule(0.1, 100)
    start = sample_path_dropout_masks(64, 3, schedule, 0, 8, generator=torch.Generator().manual_seed(0))
    assert all(bool((m == 1).all()) for m in start.inputs + start.ops)  # no dropout at step 0
    m = sample_path_dropout_masks(4096, 3, schedule, 100, 8, generator=torch.Generator().manual_seed(0))
    for t in m.inputs + m.ops:
        ghosts = t.view(512, 8, -1)
        assert bool((ghosts == ghosts[:, :1]).all())  # constant within a ghost batch
        assert bool((t.sum(1) >= 1).all())  # every block keeps an input and an operation
    # each of the 7 operations is dropped with 0.1^(1/7) = 0.72 (plus the rescue of an all-dropped ghost batch)
    p = 0.1 ** (1 / 7)
    expected_keep = 1 - p + p**7 / 7
    keep = m.ops[2].view(512, 8, 7)[:, 0].mean().item()
    assert abs(keep - expected_keep) < 4 * math.sqrt(expected_keep * (1 - expected_keep) / (512 * 7))
    again = sample_path_dropout_masks(4096, 3, schedule, 100, 8, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(m.ops + m.inputs, again.ops + again.inputs))


def test_path_dropout_bad_input():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        sample_path_dropout_masks(30, 2, PathDropoutSchedule(0.1, 10), 1, 8)
    for r in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="r must lie in"):
            PathDropoutSchedule(r, 10)


# ----------------------------------------------------------------------------------------------
# ghost batch norm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_ghost_batch_norm_is_batch_norm_per_ghost_batch(fused):
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, 4, fused=fused).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = torch.randn(12, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    expected = torch.cat([F.batch_norm(x[i : i + 4], None, None, bn.weight, bn.bias, training=True) for i in range(0, 12, 4)])
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    want = torch.autograd.grad(expected, (x, bn.weight, bn.bias), g)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)
    bn.eval()
    torch.testing.assert_close(bn(x), y)  # statistics on the fly in evaluation too (§3.2)


def test_ghost_batch_norm_bad_input():
    with pytest.raises(ValueError, match="ghost_batch_size must be an int >= 2"):
        GhostBatchNorm2d(3, 1)
    with pytest.raises(ValueError, match="not a multiple of ghost_batch_size = 4"):
        GhostBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))
    for fused in (True, False):
        with pytest.raises(ValueError, match=r"x must be \[B, C = 3, H, W\], got \(4, 2, 2, 2\)"):
            GhostBatchNorm2d(3, 2, fused=fused)(torch.randn(4, 2, 2, 2))
    for eps in (-1.0, 0.0, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            GhostBatchNorm2d(3, 2, eps=eps)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        GhostBatchNorm2d(0, 2)
    with pytest.raises(TypeError, match="fused must be a bool"):
        GhostBatchNorm2d(3, 2, fused="no")


def test_ghost_batch_norm_takes_non_contiguous_inputs():
    """A transposed (non-contiguous) input gives what its contiguous copy gives, in both forms."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)
    for fused in (True, False):
        norm = GhostBatchNorm2d(3, 2, fused=fused)
        torch.testing.assert_close(norm(x), norm(x.contiguous()))


def test_all_paths_dropped_gives_zeros_with_a_ghost_batch_norm_candidate():
    """Every weight zero: the sparse mix learns the output's shape by running the first candidate
    on an empty batch (a ghost batch norm rejects a single example) and returns zeros."""
    from bnas_fast.nn import MixedOp

    torch.manual_seed(0)
    op = MixedOp([torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), GhostBatchNorm2d(3, 2)), torch.nn.Identity()])
    frozen = op.candidates[0][1]
    frozen.eval()  # a submodule left in eval inside a training candidate stays so
    out = op(torch.randn(4, 3, 5, 5), torch.zeros(4, 2))
    assert torch.equal(out, torch.zeros(4, 3, 5, 5))
    assert op.candidates[0].training and not frozen.training


# ----------------------------------------------------------------------------------------------
# the one-shot model
# ----------------------------------------------------------------------------------------------


def test_mix_modules_with_one_input_per_candidate_matches_the_dense_sum():
    torch.manual_seed(0)
    paths = [torch.nn.Linear(3, 2).double(), torch.nn.Linear(5, 2).double()]
    xs = [torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)]
    w = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.float64)
    expected = paths[0](xs[0]) * w[:, :1] + paths[1](xs[1]) * w[:, 1:]
    torch.testing.assert_close(mix_modules(paths, xs, w, sparse=True), expected)
    torch.testing.assert_close(mix_modules(paths, xs, w, sparse=False), expected)
    with pytest.raises(ValueError, match="x\\[1\\] has batch 4"):
        mix_modules(paths, [xs[0], xs[1][:4]], w)


@pytest.mark.parametrize("step", [3, 10])
def test_fused_sparse_model_equals_plain_masked_model(step):
    """Running each path only on the ghost batches that keep it gives what running every path on
    every example and multiplying by the mask gives, in values and in every gradient."""
    fused, plain = _model(True), _model(False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(16, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    masks = _masks(16, step=step)
    out_f, out_p = fused(x, masks), plain(x, masks)
    torch.testing.assert_close(out_f, out_p, rtol=1e-10, atol=1e-10)
    F.cross_entropy(out_f, y).backward()
    F.cross_entropy(out_p, y).backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        gp = torch.zeros_like(p) if p.grad is None else p.grad
        gq = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(gp, gq, rtol=1e-9, atol=1e-10, msg=name)


def test_stand_alone_model_with_the_same_weights_computes_the_same_function():
    model = _model(True)
    arch = Architecture.sample(3, torch.Generator().manual_seed(5))
    alone = model.extract(arch)
    assert set(alone.state_dict()) < set(model.state_dict())
    assert alone.num_parameters() == model.num_parameters(arch) < model.num_parameters()
    x = torch.randn(8, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(alone(x), model(x, arch.path_masks(8, dtype=torch.float64)), rtol=1e-10, atol=1e-10)
    # the all-on architecture is the whole model
    everything = Architecture.all_on(3)
    assert model.num_parameters(everything) == model.num_parameters()
    torch.testing.assert_close(model(x), model(x, everything.path_masks(8, dtype=torch.float64)), rtol=1e-10, atol=1e-10)


def test_l2_penalty_counts_only_the_used_parts():
    model = _model(True)
    arch = Architecture.sample(3, torch.Generator().manual_seed(1))
    alone = model.extract(arch)
    used = sum(m.weight.pow(2).sum() for m in alone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    torch.testing.assert_close(model.l2_penalty(arch.path_masks(8, dtype=torch.float64)), used)
    everything = sum(m.weight.pow(2).sum() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    torch.testing.assert_close(model.l2_penalty(), everything)
    # two ghost batches with two architectures: the mean of their penalties
    other = Architecture.sample(3, torch.Generator().manual_seed(2))
    both = PathMasks.cat([arch.path_masks(4, dtype=torch.float64), other.path_masks(4, dtype=torch.float64)])
    torch.testing.assert_close(model.l2_penalty(both), (model.l2_penalty(arch.path_masks(4, dtype=torch.float64))
                                                        + model.l2_penalty(other.path_masks(4, dtype=torch.float64))) / 2)


def test_one_shot_model_bad_input():
    model = _model(True)
    x = torch.randn(8, 1, 12, 12, dtype=torch.float64)
    masks = _masks(8)
    masks.ops[0] = masks.ops[0].clone()
    masks.ops[0][1] = 1 - masks.ops[0][0]  # differs inside the first ghost batch
    with pytest.raises(ValueError, match=r"masks.ops\[0\] must be constant within each ghost batch of 4"):
        model(x, masks)
    for bad in (0.5, 2.0, float("nan")):  # only 0 and 1; NaN is not "non-constant"
        masks = _masks(8)
        masks.inputs[1] = masks.inputs[1].clone()
        masks.inputs[1][:, 2] = bad  # constant over the batch, so only the 0/1 check can catch it
        with pytest.raises(ValueError, match=r"masks.inputs\[1\] must hold only 0 and 1 .* at \[0, 2\]"):
            model(x, masks)
    with pytest.raises(ValueError, match=r"masks.inputs\[1\] must have shape \[8, 3\]"):
        model(x, PathMasks([_masks(8).inputs[0], _masks(8).inputs[1][:, :2], _masks(8).inputs[2]], _masks(8).ops))
    with pytest.raises(ValueError, match="not a multiple of ghost_batch_size = 4"):
        model(x[:6])
    alone = model.extract(Architecture.all_on(3))
    with pytest.raises(ValueError, match="masks are for the one-shot model"):
        alone(x, _masks(8))
    with pytest.raises(ValueError, match="arch has 2 blocks"):
        OneShotNet(**SMALL, arch=Architecture.all_on(2))
    with pytest.raises(ValueError, match="ghost_batch_size must be an int >= 2"):
        OneShotNet(**{**SMALL, "ghost_batch_size": 1})
    with pytest.raises(ValueError, match="norm must be"):
        OneShotNet(**SMALL, norm="layer")


def test_one_shot_model_compiles_fullgraph():
    torch._dynamo.reset()
    model = _model(True, dtype=torch.float32, num_blocks=2)
    x = torch.randn(8, 1, 8, 8)
    masks = _masks(8, num_blocks=2, dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, masks), model(x, masks), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# scoring and the method
# ----------------------------------------------------------------------------------------------


def test_batched_one_shot_scoring_equals_separate_models():
    model = _model(True)
    gen = torch.Generator().manual_seed(0)
    archs = [Architecture.sample(3, gen) for _ in range(5)]
    x = torch.randn(12, 1, 12, 12, dtype=torch.float64)
    batched = oneshot.one_shot_log_probs(model, archs, x, archs_per_pass=2, chunk=8)
    separate = oneshot.separate_models_log_probs(model, archs, x, chunk=8)
    assert batched.shape == (5, 12, 5)
    torch.testing.assert_close(batched, separate, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not a multiple of ghost_batch_size = 4"):
        oneshot.one_shot_log_probs(model, archs, x[:10])


def test_symmetrised_kl():
    p = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    torch.testing.assert_close(oneshot.symmetrised_kl(p, q), kl(p, q) + kl(q, p))
    assert torch.allclose(oneshot.symmetrised_kl(p, p), torch.zeros(4, dtype=torch.float64))


def test_stratified_sample_takes_from_every_bucket():
    scores = [float(i) for i in range(20)]
    picked = oneshot.stratified_sample(scores, 4, 2, torch.Generator().manual_seed(0))
    assert len(picked) == 8 and len(set(picked)) == 8
    assert sorted(i // 5 for i in picked) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_run_quick_digits_is_reproducible():
    config = {"dataset": "digits", "quick": True, "progress": False, "plots": False, "threads": 1}
    state = torch.random.get_rng_state()
    a, b = oneshot.run(config), oneshot.run(config)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global generator is left alone
    assert a["architectures"] == b["architectures"]
    assert [r["standalone_val_accuracy"] for r in a["retrained"]] == [r["standalone_val_accuracy"] for r in b["retrained"]]
    assert a["throughput"]["max_abs_log_prob_difference"] < 1e-4
    assert len(a["retrained"]) >= 2 and {r["role"] for r in a["retrained"]} >= {"top", "stratified"}
    assert a["top"]["one_shot_val_accuracy"] == max(r["one_shot_val_accuracy"] for r in a["architectures"])
    for r in a["architectures"]:
        assert r["kl"] >= 0 and 0 <= r["one_shot_val_accuracy"] <= 1
    assert a["one_shot"]["training"]["steps"] >= 1


def test_run_averages_repeated_stand_alone_runs():
    config = {"dataset": "digits", "quick": True, "progress": False, "plots": False, "threads": 1}
    once, twice = oneshot.run(config), oneshot.run({**config, "retrain_repeats": 2})
    for a, b in zip(once["retrained"], twice["retrained"]):
        assert len(a["runs"]) == 1 and len(b["runs"]) == 2
        assert b["runs"][0] == {**a["runs"][0], "seconds": b["runs"][0]["seconds"]}  # repeat 0 is the single run
        assert b["standalone_test_accuracy"] == pytest.approx((b["runs"][0]["test"] + b["runs"][1]["test"]) / 2)


def test_run_writes_results_and_plots(tmp_path):
    out = tmp_path / "run"
    oneshot.run({"dataset": "digits", "quick": True, "progress": False, "threads": 1, "out_dir": str(out)})
    results = json.loads((out / "results.json").read_text())
    for name in ("oneshot_vs_standalone", "kl_vs_oneshot", "oneshot_histogram"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert name in results["files"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"r": 1.5}, "r must lie in"),
        ({"r": 0.0}, "r must lie in"),
        ({"batch_size": 100}, "batch_size = 100 must be a multiple of ghost_batch_size = 32"),
        ({"ghost_batch_size": 1}, "ghost_batch_size must be an int >= 2"),
        ({"dataset": "cifar"}, "dataset must be"),
        ({"num_architectures": 1}, "num_architectures must be an int >= 2"),
        ({"retrain_repeats": 0}, "retrain_repeats must be an int >= 1"),
        ({"bogus": 1}, "unknown config key"),
    ],
)
def test_run_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        oneshot.run({"dataset": "digits", "quick": True, "progress": False, **change})


def test_quick_does_not_override_explicit_strata():
    quick = oneshot.OneShotConfig(quick=True).resolved()
    assert (quick.strata, quick.per_stratum) == (2, 1)
    explicit = oneshot.OneShotConfig(quick=True, strata=5, per_stratum=3).resolved()
    assert (explicit.strata, explicit.per_stratum) == (5, 3)
    full = oneshot.OneShotConfig().resolved()
    assert (full.strata, full.per_stratum) == (4, 3)


@pytest.mark.parametrize("data, error, pattern", [
    ({"blocks": [{"inputs": 0, "ops": ["sep3"]}]}, TypeError, r"blocks\[0\].inputs must be a list, got int"),
    ({"blocks": [{"inputs": [0], "ops": "sep3"}]}, TypeError, r"blocks\[0\].ops must be a list, got str"),
    ({"blocks": [{"input": [0], "ops": ["sep3"]}]}, ValueError, r"blocks\[0\] has unknown keys \['input'\]"),
    ({"blocks": {"inputs": [0], "ops": ["sep3"]}}, TypeError, r"blocks must be a list, got dict"),
    ({"blocks": None}, TypeError, r"blocks must be a list, got NoneType"),
    ({"blocks": [{"inputs": [0], "ops": ["sep3"]}], "operations": "sep3"}, TypeError, r"operations must be a list, got str"),
    ({"blocks": [{"inputs": [0], "ops": ["sep3"]}], "block": []}, ValueError, r"unknown keys \['block'\]"),
])
def test_malformed_architecture_dicts_name_the_field(data, error, pattern):
    """A review of 2026-12-02 found strings read character by character, None failing inside
    tuple(), and misspelt keys ignored."""
    with pytest.raises(error, match=pattern):
        Architecture.from_dict(data)


def test_architecture_input_indices_of_any_integral_type():
    import numpy as np

    arch = Architecture.from_dict({"blocks": [{"inputs": [np.int64(1)], "ops": ["sep3"]}]})
    assert arch.blocks[0].inputs == (1,) and type(arch.blocks[0].inputs[0]) is int


def test_one_shot_net_checks_the_ghost_batch_size_with_plain_batch_norm():
    with pytest.raises(ValueError, match=r"OneShotNet: ghost_batch_size must be a positive int, got 0"):
        OneShotNet(1, 3, channels=4, num_blocks=1, ghost_batch_size=0, norm="batch")
