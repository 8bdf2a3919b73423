"""Tests of networks with stochastic architectures (bnas_fast.nn.nsa, bnas_fast.methods.nsa)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import bnas_fast.nn
from bnas_fast.methods import nsa
from bnas_fast.nn.nsa import NSANet, NSAStage, sample_architectures


def test_sampler_chain_density_reproducibility_and_global_rng():
    state = torch.get_rng_state()
    adj = sample_architectures(3000, 5, p=0.3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert adj.shape == (3000, 6, 6)
    assert torch.equal(adj, sample_architectures(3000, 5, p=0.3, seed=4))
    assert not torch.equal(adj, sample_architectures(3000, 5, p=0.3, seed=5))
    assert torch.all(adj.tril() == 0)  # a DAG over nodes in order
    assert torch.all(torch.diagonal(adj, offset=1, dim1=1, dim2=2) == 1)  # the chain
    # the other 15 - 5 = 10 possible edges: on with probability 0.3 (3000 * 10 draws, sd ~ 0.0026)
    off_chain = adj.triu(diagonal=2).sum() / (3000 * 10)
    assert abs(float(off_chain) - 0.3) < 0.015
    with pytest.raises(ValueError, match="p must be in"):
        sample_architectures(2, 3, p=1.5)
    with pytest.raises(ValueError, match="num_nodes"):
        sample_architectures(2, 0)


def test_stage_aggregates_exactly_the_predecessors_of_each_examples_architecture():
    """Node j's input is the sum of its predecessors' outputs under the example's own architecture:
    compare with a loop over examples that wires each one by hand."""
    torch.manual_seed(0)
    adjacency = sample_architectures(4, 3, seed=1)
    stage = NSAStage(2, adjacency, conditional=False).eval()
    x = torch.randn(5, 2, 4, 4)
    arch = torch.tensor([0, 3, 1, 3, 2])
    out = stage(x, arch)
    for b in range(5):
        outputs = [x[b : b + 1]]
        for j in range(1, 4):
            h = sum(outputs[i] for i in range(j) if adjacency[arch[b], i, j] == 1)
            outputs.append(stage.norms[j - 1](stage.convs[j - 1](torch.relu(h)), torch.zeros(1, dtype=torch.long)))
        torch.testing.assert_close(out[b : b + 1], outputs[-1], rtol=1e-5, atol=1e-6)


def test_per_example_architectures_equal_running_them_alone_in_eval_mode():
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=2, num_nodes=3, num_archs=6, variant="nsa_i").eval()
    x = torch.randn(6, 1, 8, 8)
    arch = torch.tensor([0, 5, 2, 2, 4, 1])
    mixed = net(x, arch)
    for b in range(6):
        torch.testing.assert_close(mixed[b : b + 1], net(x[b : b + 1], int(arch[b])), rtol=1e-5, atol=1e-6)
    # different architectures really give different functions
    assert not torch.allclose(net(x, 0), net(x, 5))


@pytest.mark.parametrize("variant", ["nsa_i", "nsa_id"])
def test_fused_model_matches_its_plain_pytorch_twin(variant):
    torch.manual_seed(0)
    fused = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant=variant)
    plain = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant=variant, fused=False)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    arch = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    for step in range(2):  # train mode (batch statistics, running averages), twice
        loss_f, loss_p = F.cross_entropy(fused(x, arch), y), F.cross_entropy(plain(x, arch), y)
        torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
        grads_f = torch.autograd.grad(loss_f, list(fused.parameters()))
        grads_p = torch.autograd.grad(loss_p, list(plain.parameters()))
        for (name, _), a, b in zip(fused.named_parameters(), grads_f, grads_p):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    fused.eval()
    plain.eval()
    torch.testing.assert_close(fused(x, arch), plain(x, arch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_batch_norm_of_stem_and_downs_is_nn_batch_norm(momentum):
    """The fused NSANet's stem and down-sampling BatchNorm: nn.BatchNorm2d over the fused kernel
    (outputs, gradients, running statistics and counter after 3 batches, then eval mode)."""
    from bnas_fast.nn.nsa import _FusedBatchNorm2d

    gen = torch.Generator().manual_seed(4)
    fused, plain = _FusedBatchNorm2d(3, momentum=momentum).double(), torch.nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5), fused.bias.uniform_(-1, 1)
    plain.load_state_dict(fused.state_dict())
    for _ in range(3):
        x = (2 + 3 * torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)).requires_grad_()
        y_f, y_p = fused(x), plain(x)
        torch.testing.assert_close(y_f, y_p)
        grad = torch.randn_like(y_f)
        params_f, params_p = [x, fused.weight, fused.bias], [x, plain.weight, plain.bias]
        for a, b in zip(torch.autograd.grad(y_f, params_f, grad), torch.autograd.grad(y_p, params_p, grad)):
            torch.testing.assert_close(a, b)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, msg=lambda m, n=name: f"{n}: {m}")
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x))


def test_nsa_id_parameters_of_absent_architectures_get_no_gradient():
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=1, num_nodes=3, num_archs=4, variant="nsa_id")
    x = torch.randn(6, 1, 6, 6)
    arch = torch.tensor([0, 0, 2, 2, 0, 2])  # architectures 1 and 3 absent
    F.cross_entropy(net(x, arch), torch.randint(0, 3, (6,))).backward()
    stage = net.stages[0]
    for absent in (1, 3):
        assert torch.count_nonzero(stage.coefficients.grad[absent]) == 0
        assert torch.count_nonzero(stage.norms[0].weight.grad[absent]) == 0
    assert torch.count_nonzero(stage.norms[0].weight.grad[0]) > 0
    # coefficients off the edges never move
    off = stage.adjacency == 0
    assert torch.count_nonzero(stage.coefficients.grad[off]) == 0


def test_with_architectures_evaluates_unseen_wirings_with_shared_weights():
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=2, num_nodes=3, num_archs=4, variant="nsa_i").eval()
    unseen = [sample_architectures(2, 3, seed=99), sample_architectures(2, 3, seed=98)]
    other = net.with_architectures(unseen)
    assert other.stages[0].convs[0].weight is net.stages[0].convs[0].weight
    x = torch.randn(3, 1, 6, 6)
    # an "unseen" space that repeats architecture 2 of the training space gives the same function
    same = net.with_architectures([s.adjacency[2:3] for s in net.stages])
    torch.testing.assert_close(same(x, 0), net(x, 2))
    assert other(x, 1).shape == (3, 3)
    assert net.stages[0].adjacency.shape[0] == 4  # the original is untouched
    with pytest.raises(ValueError, match="shared weights"):
        NSANet(1, 3, width=4, num_archs=2, variant="nsa_id").with_architectures(unseen)
    # a stage left out, a wrong node count, unequal S', entries off the strict upper triangle: refused
    wrong_nodes = sample_architectures(2, 4, seed=97)
    loop = unseen[1].clone()
    loop[0, 2, 1] = 1
    for bad, match in (([unseen[0]], r"a list of 2 tensors"), ([unseen[0], wrong_nodes], r"adjacencies\[1\] must be \[S', 4, 4\]"),
                       ([unseen[0], unseen[1][:1]], "same number S'"), ([unseen[0], loop], "above the diagonal only"),
                       ([unseen[0], unseen[1] * 2], "0/1 entries")):
        with pytest.raises(ValueError, match=match):
            net.with_architectures(bad)


def test_statistics_helpers_by_hand():
    assert nsa.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert nsa.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert nsa.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, rel=1e-6)  # ties averaged
    assert nsa.auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert nsa.auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert nsa.auroc([0.1, 0.5], [0.5, 0.9]) == pytest.approx(0.875)  # one tie counts 1/2
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident, disagreeing members
    assert float(nsa.mutual_information(p)[0]) == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert float(nsa.mutual_information(agree)[0]) == pytest.approx(0.0, abs=1e-7)


def _tiny(out_dir, **overrides):
    config = dict(
        dataset="digits", epochs=1, n_train=96, n_test=64, num_archs=4, width=4, num_stages=2, num_nodes=3,
        eval_archs=3, max_ensemble=3, batch_size=32, out_dir=str(out_dir), progress=False,
    )
    config.update(overrides)
    return config


def test_run_end_to_end_writes_json_and_plots_and_is_reproducible(tmp_path):
    first = nsa.run(_tiny(tmp_path / "a"))
    for name in ("results.json", "fig2_accuracy_histograms.png", "fig4_ensemble.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    with open(tmp_path / "a" / "results.json") as fh:
        saved = json.load(fh)
    arch = saved["architectures"]
    assert len(arch["accuracy_eval_bn"]) == len(arch["accuracy_train_bn"]) == len(arch["accuracy_calibrated_bn"]) == 3
    assert -1.0 <= arch["spearman_train_vs_calibrated_bn"] <= 1.0 and arch["calibrated_bn_std"] >= 0
    assert [e["T"] for e in saved["ensemble"]] == [1, 2, 3]
    assert 0.0 <= saved["uncertainty"]["auroc"] <= 1.0 and saved["uncertainty"]["ood_source"]
    assert 0.0 <= saved["seen_unseen"]["auc"] <= 1.0
    second = nsa.run(_tiny(tmp_path / "b", plots=False))
    assert json.dumps(second["architectures"]) == json.dumps(first["architectures"])  # NaN-safe equality
    assert second["training"]["epoch_losses"] == first["training"]["epoch_losses"]


@pytest.mark.parametrize("variant", ["nsa_i", "nsa_id"])
def test_channels_last_model_equals_the_contiguous_one(variant):
    """model.to(memory_format=torch.channels_last): every activation stays channels-last through the
    fused ops, with the same loss and gradients (float64) as the contiguous model."""
    torch.manual_seed(0)
    contiguous = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant=variant).double()
    last = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant=variant).double()
    last.load_state_dict(contiguous.state_dict())
    last.to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    arch = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(3))
    layouts = []
    last.stages[0].convs[1].register_forward_hook(
        lambda module, inputs, output: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    loss_c, loss_l = F.cross_entropy(contiguous(x, arch), y), F.cross_entropy(last(x, arch), y)
    assert layouts == [True]  # the mix and ReLU before a node's convolution kept the layout
    torch.testing.assert_close(loss_l, loss_c)
    grads_c = torch.autograd.grad(loss_c, list(contiguous.parameters()))
    grads_l = torch.autograd.grad(loss_l, list(last.parameters()))
    for (name, _), a, b in zip(contiguous.named_parameters(), grads_c, grads_l):
        torch.testing.assert_close(b, a, msg=lambda m, n=name: f"{n}: {m}")


def test_channels_last_run_is_reproducible(tmp_path):
    first = nsa.run(_tiny(tmp_path / "a", plots=False, channels_last=True))
    second = nsa.run(_tiny(tmp_path / "b", plots=False, channels_last=True))
    assert second["training"]["epoch_losses"] == first["training"]["epoch_losses"]
    contiguous = nsa.run(_tiny(tmp_path / "c", plots=False))
    # the same computation in another layout: float32 rounding only
    for a, b in zip(first["training"]["epoch_losses"], contiguous["training"]["epoch_losses"]):
        assert abs(a - b) < 1e-3 * abs(b)


def test_compare_runs_every_variant(tmp_path):
    config = _tiny(tmp_path, n_train=64, n_test=32)
    config.pop("out_dir")
    result = nsa.compare(config, out_dir=str(tmp_path))
    assert [(r["variant"], r["running_stats"]) for r in result["rows"]] == list(nsa.COMPARISON)
    assert result["markdown"].count("\n| nsa") == len(nsa.COMPARISON)
    from bnas_fast.methods._config import _json_safe  # NaN (tied ranks at this size) is written as null

    assert json.load(open(tmp_path / "comparison.json")) == json.loads(json.dumps(_json_safe(result["rows"])))
    # per-architecture and conditional variants have no seen/unseen AUC (their unseen wirings have no parameters)
    by = {(r["variant"], r["running_stats"]): r for r in result["rows"]}
    assert by[("nsa_id", "shared")]["seen_unseen_auc"] is None and by[("nsa_i", "shared")]["seen_unseen_auc"] is not None


def test_calibration_repairs_stale_statistics_of_one_architecture_and_can_be_switched_off(tmp_path):
    """BN calibration per architecture: on a model whose running statistics are garbage, calibrating
    on the test images themselves gives eval-mode predictions equal to train mode's on those images
    (one batch: the batch statistics, up to n / (n - 1) in the variance)."""
    torch.manual_seed(0)
    model = NSANet(1, 3, width=4, num_stages=2, num_nodes=2, num_archs=3)
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_var.fill_(100.0)
    x = torch.randn(200, 1, 8, 8)
    model.train()
    with torch.no_grad():
        expected = torch.softmax(model(x, 1), -1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrated = nsa._calibrated_probs(model, x, x, 1, batches=1, batch=200)
    torch.testing.assert_close(calibrated, expected, rtol=0, atol=2e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # calibrated a copy
    assert not model.training
    off = nsa.run(_tiny(tmp_path, calibration_batches=0, plots=False))["architectures"]
    assert "accuracy_calibrated_bn" not in off and "accuracy_eval_bn" in off


def test_compare_table_averages_over_seeds():
    """compare_table: one line per (variant, running stats), the mean over seeds ± the standard error."""
    base = dict(eval_range=0.1, train_std=0.004, mean_single_ece=0.01, ensemble_accuracy=0.9, ensemble_ece=0.02, mi_auroc=0.8, seen_unseen_auc=None)
    rows = [
        dict(base, variant="nsa", running_stats="shared", seed=0, spearman=0.2, eval_std=0.01, mean_single_accuracy=0.90),
        dict(base, variant="nsa", running_stats="shared", seed=1, spearman=0.4, eval_std=0.03, mean_single_accuracy=0.94),
        dict(base, variant="nsa_i", running_stats="shared", seed=0, spearman=0.5, eval_std=0.02, mean_single_accuracy=0.95),
    ]
    lines = nsa.compare_table(rows).splitlines()
    nsa_line = next(line for line in lines if line.startswith("| nsa |"))
    # mean 0.3, standard error stdev([0.2, 0.4]) / sqrt(2) = 0.1; accuracy 92% ± 2
    assert "| 0.30 ± 0.10 | 2.00 ± 1.00 | 10.00 ± 0.00 | 0.40 ± 0.00 |" in nsa_line and "| 92.00% ± 2.00 |" in nsa_line
    nsa_i_line = next(line for line in lines if line.startswith("| nsa_i |"))
    assert "| 0.50 | 2.00 |" in nsa_i_line and nsa_i_line.endswith("| - |")  # one seed: no ±; no AUC
    assert lines[-1] == "(seeds 0, 1; ± is the standard error over seeds)"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(variant="nsa_x"), r"variant must be one of"),
        (dict(running_stats="per_example"), r"running_stats must be"),
        (dict(bn_momentum_per="epoch"), r"bn_momentum_per must be 'batch' or 'update', got 'epoch'"),
        (dict(num_archs=1), r"num_archs must be an int >= 2"),
        (dict(n_train=1), r"need at least 2 training images"),
        (dict(batch_size=1), r"batch_size must be an int >= 2"),
        (dict(lr=0.0), r"lr > 0"),
        (dict(calibration_batches=-1), r"calibration_batches must be an int >= 0"),
        (dict(dataset="cifar"), r"dataset must be"),
        (dict(unknown_key=1), r"unknown config key"),
    ],
)
def test_bad_config_values_name_the_key(overrides, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        nsa.run(_tiny(tmp_path, **overrides))


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="variant must be one of"):
        NSANet(1, 3, variant="x")
    with pytest.raises(IndexError, match="arch = 7 is out of range for S = 2"):
        NSANet(1, 3, width=2, num_archs=2)(torch.randn(2, 1, 4, 4), 7)
    with pytest.raises(ValueError, match="plain-PyTorch twin"):
        NSAStage(2, sample_architectures(2, 2), conditional=False, running_stats="per_arch", fused=False)


def test_cli_run_nsa(tmp_path, capsys):
    from bnas_fast.cli import main

    assert main(["run", "nsa", "--quick", "--dataset", "digits", "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    assert "nsa_i (shared) seed 0" in capsys.readouterr().out
    assert (tmp_path / "nsa_i_shared_seed0" / "results.json").is_file()


def test_per_arch_statistics_keep_a_shared_affine_for_nsa_i():
    """running_stats="per_arch" changes only the running statistics: NSA-i keeps one affine map per
    channel (per-architecture affine parameters are NSA-id's), and its statistics are [S, C]."""
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=1, num_nodes=2, num_archs=5, variant="nsa_i", running_stats="per_arch")
    norm = net.stages[0].norms[0]
    assert norm.weight.shape == (4,) and norm.bias.shape == (4,)
    assert norm.norm.running_mean.shape == (5, 4) and norm.norm.weight is None
    x = torch.randn(6, 1, 5, 5)
    arch = torch.tensor([0, 0, 1, 1, 3, 3])
    net(x, arch)
    assert norm.norm.num_batches_tracked.tolist() == [1, 1, 0, 1, 0]
    conditional = NSANet(1, 3, width=4, num_stages=1, num_nodes=2, num_archs=5, variant="nsa_id", running_stats="per_arch")
    assert conditional.stages[0].norms[0].weight.shape == (5, 4)


@pytest.mark.parametrize("variant", ["nsa", "nsa_id"])
@pytest.mark.parametrize("momentum_per", ["batch", "update"])
def test_momentum_per_reaches_every_per_architecture_batch_norm(variant, momentum_per):
    """NSANet hands momentum_per to every stage BatchNorm with per-architecture statistics, and each
    counts training batches: after batches of architectures 0, 1, 0 (one per batch, as NSA trains),
    architecture 1 was last met 1 batch ago and architecture 2 never (3 batches). The moves these
    counts give are tested on the module (test_arch_batch_norm.py)."""
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=2, num_nodes=2, num_archs=3, variant=variant, running_stats="per_arch",
                 momentum_per=momentum_per)
    norms = [m for m in net.modules() if isinstance(m, bnas_fast.nn.ArchBatchNorm2d)]
    assert len(norms) == 4 and all(m.momentum_per == momentum_per for m in norms)
    for a in (0, 1, 0):
        net(torch.randn(4, 1, 6, 6), a)
    assert all(m.batches_since_update.tolist() == [0, 1, 3] for m in norms)


def test_model_checks_momentum_per_in_both_forms():
    for fused in (True, False):
        with pytest.raises(ValueError, match="NSANet: momentum_per must be 'batch' or 'update', got 'epoch'"):
            NSANet(1, 3, width=2, num_archs=2, momentum_per="epoch", fused=fused)


def test_update_rule_runs_write_apart_and_are_labelled(tmp_path, capsys):
    """The two rules of per-architecture statistics must not overwrite each other's results."""
    from bnas_fast.cli import main

    common = ["run", "nsa", "--quick", "--dataset", "digits", "--running-stats", "per_arch", "--out", str(tmp_path),
              "--no-progress", "--no-plots"]
    assert main(common) == 0
    assert main(common + ["--bn-momentum-per", "update"]) == 0
    out = capsys.readouterr().out
    assert "nsa_i (per_arch) seed 0" in out and "nsa_i (per_arch_update) seed 0" in out
    batch = json.loads((tmp_path / "nsa_i_per_arch_seed0" / "results.json").read_text())
    update = json.loads((tmp_path / "nsa_i_per_arch_update_seed0" / "results.json").read_text())
    assert (batch["config"]["bn_momentum_per"], update["config"]["bn_momentum_per"]) == ("batch", "update")
    assert nsa._compare_row("nsa_i", "per_arch", 0, update)["running_stats"] == "per_arch_update"


def test_train_mode_evaluation_leaves_every_buffer_as_it_was():
    """Scoring with BN in train mode (each test batch's statistics) must not touch the running
    statistics or their batch counters (a later training step would see them)."""
    torch.manual_seed(0)
    net = NSANet(1, 3, width=4, num_stages=2, num_nodes=2, num_archs=3, variant="nsa", running_stats="per_arch")
    net(torch.randn(4, 1, 6, 6), 0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    nsa._probs(net, torch.randn(5, 1, 6, 6), 1, bn_train=True)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_option_errors_are_one_line_usage_errors(capsys):
    """A method's own option checks exit with status 2 and one line on stderr (no traceback)."""
    from bnas_fast.cli import main

    for argv, message in [
        (["run", "nsa", "--quick", "--epochs", "-1"], "nsa: epochs must be an int >= 1, got -1"),
        (["run", "nsa", "--seeds", "0", "1"], "nsa: --seeds goes with --compare"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_refused_arch_moves_no_statistics_and_bad_arch_names_the_argument():
    """arch was checked inside the first stage, after the stem's BatchNorm had run (a review of
    2026-12-02): a refused call moved its running statistics. It is checked first now, and a
    bool, a wrong length or dtype name the argument."""
    net = NSANet(1, 3, width=4, num_stages=2, num_nodes=3, num_archs=5, variant="nsa_i").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    for arch, error, pattern in [
        (torch.tensor([0, 1, 2, 9]), IndexError, r"NSANet: arch holds 9, out of range for S = 5"),
        (torch.tensor([0, 1, 2]), ValueError, r"NSANet: arch must be an int64 tensor \[B\] with B = 4"),
        (torch.tensor([0, 1, 2, 3], dtype=torch.int32), ValueError, r"NSANet: arch must be an int64 tensor"),
        (True, TypeError, r"NSANet: arch must be an int or an int64 tensor \[B\], got bool"),
    ]:
        with pytest.raises(error, match=pattern):
            net(x, arch)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_stage_adjacency_must_be_upper_triangular_zeros_and_ones():
    good = sample_architectures(3, 3)
    for bad in (good * 0.5, good + torch.eye(4)):
        with pytest.raises(ValueError, match=r"NSAStage: adjacency must hold 0 and 1 only, above the diagonal"):
            NSAStage(4, bad, conditional=False)


def test_recalibration_covers_the_plain_twins_stage_norms():
    """NSANet(fused=False)'s stage norms are not nn.BatchNorm modules: recalibrate_batch_norm
    skipped them (a review of 2026-12-02), and the plain twin then differed from the fused model
    after the same calibration. Now both give the same statistics and outputs."""
    torch.manual_seed(0)
    fused = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant="nsa_i").double()
    plain = NSANet(1, 4, width=4, num_stages=2, num_nodes=3, num_archs=5, variant="nsa_i", fused=False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    for net in (fused, plain):
        net.train()(x * 3 + 1, torch.arange(8) % 5)  # running statistics away from the calibration's
        bnas_fast.nn.recalibrate_batch_norm(net, [(x[:4], 2), (x[4:], 2)])
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(plain.eval()(x, 2), fused.eval()(x, 2), rtol=1e-10, atol=1e-12)
