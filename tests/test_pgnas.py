"""PGNAS (seed 001): the super-network, its architectures and parameter counts, the method end to end."""

import json
import os

import pytest
import torch

from bnas_fast.methods import pgnas
from bnas_fast.nn.pgnas import PGNASNet


def _net(**kw):
    torch.manual_seed(0)
    return PGNASNet(1, 10, width=4, num_stages=2, kernel_sizes=(3, 5), **kw)


def test_network_shapes_and_searched_convolutions():
    net = _net()
    assert net(torch.randn(3, 1, 12, 12)).shape == (3, 10)
    convs = net.searched_convs()
    assert len(convs) == 2 * 2 * 2  # 2 stages x 2 branches x 2 convolutions
    assert all(m.dropout.drop_logit.shape == (1,) for m in convs.values())
    per_channel = _net(per_channel_rates=True)
    assert [m.dropout.drop_logit.shape[0] for m in per_channel.searched_convs().values()] == [4] * 4 + [8] * 4


def test_an_architecture_is_a_pruned_network():
    """Fixing a mask equals zeroing the dropped input slices of each searched convolution's kernel
    (no rescaling in PGNAS), for every example, in eval and in training mode."""
    net = _net()
    gen = torch.Generator().manual_seed(1)
    masks = net.sample_architecture(gen, drop_rate=0.5)
    pruned = _net()
    pruned.load_state_dict(net.state_dict())
    pruned.set_architecture(None)
    with torch.no_grad():
        for name, m in pruned.searched_convs().items():
            m.conv.weight.mul_(masks[name][None, :, None, None])
            m.dropout.fixed_keep = torch.ones_like(masks[name])  # no random dropout
    net.set_architecture(masks)
    x = torch.randn(5, 1, 12, 12)
    net.eval(), pruned.eval()
    torch.testing.assert_close(net(x), pruned(x))
    # the candidate's parameters: C_out * k * k per kept input slice, plus everything not searched
    expected = sum(p.numel() for p in net.parameters()) - sum(1 for _ in net.searched_convs())
    for name, m in net.searched_convs().items():
        w = m.conv.weight
        expected -= int((1 - masks[name]).sum()) * w.shape[0] * w.shape[2] * w.shape[3]
    assert net.count_parameters(masks) == expected
    assert net.count_parameters() == sum(p.numel() for p in net.parameters()) - len(net.searched_convs())


def test_sampled_architectures_follow_the_learned_rates():
    net = PGNASNet(1, 10, width=64, num_stages=1, kernel_sizes=(3,), init_drop=0.3)
    gen = torch.Generator().manual_seed(0)
    kept = torch.cat([torch.cat(list(net.sample_architecture(gen).values())) for _ in range(20)])
    assert abs(float(kept.mean()) - 0.7) < 0.03


def test_regularizer_is_the_sum_over_searched_convolutions():
    net = _net()
    total = net.regularizer(2.0, 500)
    parts = sum(float(m.regularizer(2.0, 500).detach()) for m in net.searched_convs().values())
    assert abs(float(total.detach()) - parts) < 1e-6
    total.backward()
    assert all(m.dropout.drop_logit.grad is not None for m in net.searched_convs().values())


def _tiny(tmp_path, **kw):
    base = dict(dataset="digits", seed=0, epochs=2, width=4, num_stages=2, candidates=6, sweep=(1, 3, 6), ft_epochs=1,
                n_train=160, n_val=40, n_test=60, threads=1, progress=False, out_dir=str(tmp_path))
    base.update(kw)
    return base


def test_run_writes_results_and_plots_and_is_reproducible(tmp_path):
    first = pgnas.run(_tiny(tmp_path / "a"))
    saved = json.load(open(tmp_path / "a" / "results.json"))
    for name in ("drop_rates.png", "candidates.png", "candidates_sweep.png"):
        assert os.path.isfile(tmp_path / "a" / name)
    for key in ("pgnas", "random", "fixed_rate_on_pgnas_weights"):
        r = saved[key]
        assert len(r["val_accuracies"]) == 6 and [s["candidates"] for s in r["sweep"]] == [1, 3, 6]
        assert r["best_val_accuracy"] == max(r["val_accuracies"])
        assert 0 < r["best_parameters"] <= saved["full_model"]["parameters"]
    assert 0 < saved["random_drop_rate"] < 1 and "test_accuracy" in saved["random"]["fine_tuned"]
    # the learned rates moved away from their initial value
    assert any(abs(v[0] - 0.1) > 1e-4 for v in saved["learned_drop_rates"].values())
    second = pgnas.run(_tiny(tmp_path / "b", plots=False))
    assert second["pgnas"]["val_accuracies"] == first["pgnas"]["val_accuracies"]
    assert second["random"]["val_accuracies"] == first["random"]["val_accuracies"]
    assert second["learned_drop_rates"] == first["learned_drop_rates"]


def test_summary_table_and_cli(tmp_path, capsys):
    from bnas_fast.cli import main

    assert main(["run", "pgnas", "--quick", "--dataset", "digits", "--out", str(tmp_path), "--no-progress", "--no-plots", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| seed | PGNAS best val / test acc" in out and "\n| 0 |" in out
    assert (tmp_path / "seed0" / "results.json").is_file()


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(dataset="cifar"), r"dataset must be"),
        (dict(candidates=0), r"candidates must be an int >= 1"),
        (dict(temperature=0.0), r"temperature must be a finite number"),
        (dict(init_drop=1.0), r"init_drop must be a drop probability in \(0, 1\)"),
        (dict(sweep=(0, 2)), r"sweep must hold candidate counts >= 1"),
        (dict(lr=-1.0), r"need lr > 0"),
        (dict(unknown=1), r"unknown config key"),
    ],
)
def test_bad_config_values_name_the_key(overrides, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        pgnas.run(_tiny(tmp_path, **overrides))


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="kernel_sizes must be odd positive ints"):
        PGNASNet(1, 10, kernel_sizes=(2,))
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        PGNASNet(1, 10, width=0)
    with pytest.raises(ValueError, match=r"init_drop must be a drop probability in \(0, 1\)"):
        PGNASNet(1, 10, init_drop=0.0)
