"""BayesNAS (seed 003, issue 6): the super-network, its switch Hessians, the Laplace update, the
hierarchical coupling, connectivity-preserving pruning, derived architectures and the method end to end."""

import json
import math

import pytest
import torch

from bnas_fast.curvature import GGNBlocks, Switch
from bnas_fast.methods import bayesnas
from bnas_fast.nn.bayesnas import (
    CELL_EDGES, OPERATIONS, BayesNASSupernet, architecture_from_json, architecture_to_json, build_network,
    count_parameters, random_architecture,
)


def _net(channels=4, layout=("normal", "reduction", "normal")):
    torch.manual_seed(0)
    return BayesNASSupernet(1, 10, channels=channels, layout=layout)


def test_supernet_shapes_and_switch_groups():
    net = _net()
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    groups = net.switch_groups()
    per_type = len(CELL_EDGES["normal"]) * (1 + len(OPERATIONS))
    assert len(groups) == 2 * per_type
    assert all(len(v) == 2 for k, v in groups.items() if k.startswith("normal/"))  # 2 normal cells
    assert all(len(v) == 1 for k, v in groups.items() if k.startswith("reduction/"))
    assert all(isinstance(s, Switch) for v in groups.values() for s in v)
    assert len({id(s) for v in groups.values() for s in v}) == sum(isinstance(m, Switch) for m in net.modules())


def test_every_layer_is_supported_by_ggn_and_switch_hessians_are_nonnegative():
    net = _net()
    net.eval()
    x = torch.randn(6, 1, 8, 8)
    with GGNBlocks(net) as c:  # raises if any parametrised module is unsupported
        logits = net(x)
    blocks = c.compute(logits, "exact")
    switches = [n for n, m in net.named_modules() if isinstance(m, Switch)]
    assert len(switches) == 3 * 8 * (1 + len(OPERATIONS))  # 3 cells x 8 edges x (edge + ops)
    for n in switches:
        assert blocks[n].shape == (1, 1, 1)
        assert float(blocks[n]) >= 0 and math.isfinite(float(blocks[n]))
    H = bayesnas.switch_hessians(net, [x[:3], x[3:]], "exact")
    assert set(H) == set(net.switch_groups())
    assert all(v >= 0 for vs in H.values() for v in vs)
    assert max(v for vs in H.values() for v in vs) > 0
    # per example, averaged over batches: the mean of the two batches' GGN / 3
    name = switches[0]
    key = net.switch_names()[name]
    per_batch = []
    for xb in (x[:3], x[3:]):
        with GGNBlocks(net) as c:
            lo = net(xb)
        per_batch.append(float(c.compute(lo, "exact")[name]) / 3)
    assert H[key][0] == pytest.approx(sum(per_batch) / 2, rel=1e-5)


def test_laplace_update_matches_hand_computation():
    gamma, H, s, lam = 2.0, [0.5, 1.0], [0.6, 0.8], 0.1
    out = bayesnas.laplace_update(gamma, H, s, lam)
    # c_k = (1/2 + H_k/0.1)^-1 = 1/5.5, 1/10.5; 1/gamma - c/gamma^2 = Ht/(1 + gamma Ht) = 5/11, 10/21
    assert out["cov"] == pytest.approx([1 / 5.5, 1 / 10.5])
    omega = math.sqrt(5 / 11 + 10 / 21)
    assert out["omega"] == pytest.approx(omega)
    assert out["gamma"] == pytest.approx(1.0 / omega)  # ||(0.6, 0.8)|| = 1
    # three members, one with zero curvature (contributes 0 to omega)
    out = bayesnas.laplace_update(0.5, [0.0, 0.2, 3.0], [1.0, 2.0, 2.0], 1.0)
    omega = math.sqrt(0.2 / (1 + 0.1) + 3.0 / (1 + 1.5))
    assert out["omega"] == pytest.approx(omega)
    assert out["gamma"] == pytest.approx(3.0 / omega)
    # no curvature at all: omega floored, gamma large but finite
    out = bayesnas.laplace_update(1.0, [0.0], [1.0], 0.01)
    assert math.isfinite(out["gamma"]) and out["gamma"] > 1e6


def test_laplace_update_after_a_group_went_to_zero():
    """gamma = 0 (every switch of the group was 0 at the last update) divided by zero in the next
    epoch (review of 2026-12-02); it now takes the limit gamma -> 0, which a tiny gamma approaches."""
    H, s, lam = [0.5, 1.0, 0.0], [0.3, -0.4, 0.0], 0.1
    out = bayesnas.laplace_update(0.0, H, s, lam)
    assert out["cov"] == [0.0, 0.0, 0.0]
    assert out["omega"] == pytest.approx(math.sqrt(0.5 / lam + 1.0 / lam))
    assert out["gamma"] == pytest.approx(0.5 / out["omega"])
    near = bayesnas.laplace_update(1e-12, H, s, lam)
    assert near["omega"] == pytest.approx(out["omega"], rel=1e-9) and near["gamma"] == pytest.approx(out["gamma"], rel=1e-9)
    assert bayesnas.laplace_update(0.0, [0.0], [0.0], lam)["gamma"] == 0.0  # still nothing: stays 0, no error


def test_hierarchical_coupling():
    assert bayesnas.couple(2.0, 3.0) == pytest.approx(1.2)  # (1/2 + 1/3)^-1
    assert bayesnas.couple(1.0, 1e-9) == pytest.approx(1e-9, rel=1e-6)  # a dead edge kills its ops
    assert bayesnas.couple(1.0, 1e9) == pytest.approx(1.0, rel=1e-6)
    assert bayesnas.couple(1.0, 0.0) == 0.0
    assert bayesnas.couple(0.5, 7.0) <= min(0.5, 7.0)


def _gammas(value=1.0):
    return {t: {e: {"edge": value, **{o: value for o in OPERATIONS}} for e in CELL_EDGES[t]} for t in CELL_EDGES}


def test_pruning_keeps_the_graph_connected():
    g = _gammas()
    # both inputs of normal n0 below the threshold: n0 would be isolated, and with it n0 -> n3
    g["normal"]["in0->n0"]["edge"] = 0.01
    g["normal"]["in1->n0"]["edge"] = 0.05
    for o in OPERATIONS:
        g["normal"]["in1->n0"][o] = 0.5 if o == "conv5" else 0.2
    # an edge whose operations all fall below the threshold is dead
    for o in OPERATIONS:
        g["normal"]["in0->n1"][o] = 0.01
    # ops below the threshold die individually
    g["normal"]["in1->n2"]["max3"] = 0.02
    arch, forced = bayesnas.prune(g, 0.1, keep_one_input=False)
    assert "in0->n0" not in arch["normal"] and "in1->n0" not in arch["normal"]
    assert "n0->n3" not in arch["normal"]  # a node with no live input kills its outgoing edges
    assert arch["normal"]["in1->n3"] == list(OPERATIONS)
    assert "in0->n1" not in arch["normal"] and "in1->n1" in arch["normal"]
    assert "max3" not in arch["normal"]["in1->n2"]
    assert arch["reduction"] == {e: list(OPERATIONS) for e in CELL_EDGES["reduction"]}
    assert forced == []
    build_network(arch, 1, 10, channels=4)(torch.randn(2, 1, 8, 8))

    arch, forced = bayesnas.prune(g, 0.1, keep_one_input=True)
    assert arch["normal"]["in1->n0"] == ["conv5"]  # the best edge with its best op
    assert "in0->n0" not in arch["normal"]
    assert arch["normal"]["n0->n3"] == list(OPERATIONS)
    assert forced == ["normal/in1->n0/conv5"]

    # every gamma below the threshold: each node keeps one input (sources always alive)
    arch, forced = bayesnas.prune(_gammas(0.01), 0.1, keep_one_input=True)
    for t, edges in arch.items():
        assert {e.split("->")[1] for e in edges} == {"n0", "n1", "n2", "n3"}
        assert all(len(ops) == 1 for ops in edges.values())
    # ... or, without keep_one_input, the cell keeps only n0's best input
    arch, forced = bayesnas.prune(_gammas(0.01), 0.1, keep_one_input=False)
    assert all(len(edges) == 1 and list(edges)[0].endswith("n0") for edges in arch.values())
    assert len(forced) == 2
    build_network(arch, 1, 10, channels=4)(torch.randn(2, 1, 8, 8))


def test_architecture_json_round_trip_and_network():
    arch = random_architecture(torch.Generator().manual_seed(3))
    text = architecture_to_json(arch)
    assert architecture_from_json(text) == arch
    assert json.loads(text) == arch
    net = build_network(text, 1, 10, channels=4)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(m, Switch) for m in net.modules())
    assert count_parameters(net) < count_parameters(_net())
    with pytest.raises(ValueError, match="no edge"):
        build_network({"normal": {"in0->n3": ["conv3"]}}, 1, 10)
    with pytest.raises(ValueError, match="unknown operation"):
        build_network({"normal": {"in0->n0": ["conv7"]}}, 1, 10)


def test_pruning_mask_fixes_dead_switches_to_zero():
    net = _net()
    arch = {"normal": {"in0->n0": ["conv3"], "in1->n1": ["skip", "avg3"]}, "reduction": {"in1->n0": ["max3"]}}
    net.apply_architecture(arch)
    out = net(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    groups = net.switch_groups()
    for key, members in groups.items():
        t, e, w = key.split("/")
        alive = e in arch.get(t, {}) and (w == "edge" or w in arch[t][e])
        for s in members:
            assert s.weight.requires_grad == alive
            if not alive:
                assert float(s.weight) == 0.0
    out.sum().backward()
    assert all(s.weight.grad is None for k, v in groups.items() if k.endswith("/conv5") for s in v)


def test_masking_a_float64_network_and_refusing_to_revive_nodes():
    """The output convolution rebuilt by the mask keeps the network's dtype; asking a masked network
    to revive a dropped node (arch=None) raises and changes nothing."""
    net = _net().double()
    net.apply_architecture({"normal": {"in0->n0": ["conv3"]}, "reduction": {"in1->n0": ["max3"]}})
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    before = net(x)
    assert before.dtype == torch.float64
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [(s.weight.requires_grad, dict(e.alive)) for cell in net.cells for e in cell.edges.values() for s in [e.edge_switch]]
    with pytest.raises(ValueError, match="cannot revive nodes of an already masked super-network"):
        net.apply_architecture(None)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert flags == [(s.weight.requires_grad, dict(e.alive)) for cell in net.cells for e in cell.edges.values()
                     for s in [e.edge_switch]]
    torch.testing.assert_close(net(x), before)


def _tiny(out_dir, **kw):
    config = dict(dataset="digits", seed=0, n_train=128, n_test=64, channels=4, warmup_epochs=1, search_epochs=2,
                  retrain_epochs=1, hessian_batches=1, hessian_batch_size=32, random_candidates=5, progress=False,
                  out_dir=str(out_dir))
    config.update(kw)
    return config


def _strip(r):
    if isinstance(r, dict):
        return {k: _strip(v) for k, v in r.items() if k not in ("seconds", "search_seconds", "files", "out_dir")}
    if isinstance(r, list):
        return [_strip(v) for v in r]
    return r


def test_run_end_to_end_writes_results_and_is_reproducible(tmp_path):
    state = torch.random.get_rng_state()
    a = bayesnas.run(_tiny(tmp_path / "a"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global generator is left alone
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["derived"]["test_accuracy"] == a["derived"]["test_accuracy"]
    for name in ("gamma", "cells"):
        path = a["files"][name]
        assert path.endswith(".png") and (tmp_path / "a" / path.split("/")[-1]).stat().st_size > 1000
    assert len(a["search"]) == 2
    assert all(v > 0 for cell in a["gamma"].values() for e in cell.values() for v in e.values())
    assert set(a["architecture"]) == {"normal", "reduction"}
    assert 0 <= a["derived"]["test_accuracy"] <= 1 and 0 <= a["random"]["test_accuracy"] <= 1
    assert 0 <= a["supernet"]["test_accuracy_bn_recalibrated"] <= 1
    assert a["derived"]["parameters"] <= a["supernet"]["parameters"]
    b = bayesnas.run(_tiny(tmp_path / "b"))
    assert _strip(a) == _strip(b)
    c = bayesnas.run(_tiny(tmp_path / "c", plots=False, hessian_mode="mc", seed=1, search_epochs=1, retrain_epochs=0))
    assert _strip(c) != _strip(a)


@pytest.mark.parametrize("key,value", [
    ("lambda_edge", 0.0), ("lambda_op", -1.0), ("threshold", -0.1), ("threshold", float("nan")),
    ("hessian_mode", "kfac"), ("search_epochs", 0), ("layout", ("normal", "bogus")), ("ops", ("conv7",)),
    ("momentum", 1.0), ("keep_one_input", 1), ("batch_size", 1), ("dataset", "cifar"), ("init_gamma", 0.0),
    ("n_train", 1),
])
def test_bad_config_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        bayesnas.BayesNASConfig.from_any({key: value}).resolved()


def test_unknown_config_key_raises():
    with pytest.raises(ValueError, match="bogus"):
        bayesnas.run({"bogus": 1})


def test_recalibrated_accuracy_repairs_stale_batch_norm_statistics_on_a_copy():
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    good = float((model(x).argmax(1) == y).float().mean())
    with torch.no_grad():
        model[1].running_mean.add_(5.0)  # stale statistics, as after the switches moved
    stale = float((model(x).argmax(1) == y).float().mean())
    repaired = bayesnas.recalibrated_accuracy(model, x, x, y)
    assert good > 0.95 and stale < good - 0.2 and abs(repaired - good) < 0.02, (good, stale, repaired)
    assert float(model[1].running_mean.mean()) > 4.0  # the model itself is untouched
    bayesnas.recalibrate_batch_norm(model, x)  # in place: statistics repaired, momentum and mode restored
    assert abs(float((model(x).argmax(1) == y).float().mean()) - good) < 0.02
    assert model[1].momentum == 0.1 and not model.training


def test_quick_does_not_override_an_explicit_hessian_batches():
    assert bayesnas.BayesNASConfig(quick=True).resolved().hessian_batches == 1
    assert bayesnas.BayesNASConfig().resolved().hessian_batches == 4
    assert bayesnas.BayesNASConfig(quick=True, hessian_batches=3).resolved().hessian_batches == 3
    with pytest.raises(ValueError, match="hessian_batches must be an int >= 1, got 0"):
        bayesnas.BayesNASConfig(quick=True, hessian_batches=0).resolved()
