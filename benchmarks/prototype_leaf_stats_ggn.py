"""O(N) exact GGN blocks with train-mode BatchNorm: batch statistics as leaves.

A PROTOTYPE, not part of the library: ``GGNBlocks`` still takes the O(N^2) path for train-mode
BatchNorm (README, "Known limits"). It checks the method against that path and a brute force, and
times both (2026-12-02):

    python benchmarks/prototype_leaf_stats_ggn.py [--no-timing]

What the library version still needs: layers other than Conv2d (groups = 1), 2-D Linear and
BatchNorm2d; graphs that are not Sequential-like (each basis pass asks only for the outputs
recorded before the BatchNorm); a byte bound on the basis passes instead of ``basis_chunk``; and a
refusal when something else couples the examples (the leaves cut only BatchNorm's coupling, and
the O(N^2) fallback needs the true graph).

Design (bnas_fast README, Known limits): in the forward pass every train-mode BatchNorm's output is
replaced by gamma * (x - mu_leaf[n]) / sqrt(var_leaf[n] + eps) + beta, where mu_leaf, var_leaf are
detached copies of the batch statistics expanded per example ([N, C], requires_grad), and the
in-graph statistics s_comp = (mean(x), biased var(x)) are kept on the side (they do not reach the
logits). Then, with f_n the logits of example n and s_l the statistics of BN layer l:

    D f_n / D theta = (partial, all stats fixed) + sum_l (d f_n / d s_l) (D s_l / D theta)

1. K batched backward passes of the factors v[:, k] (no coupling once the stats are leaves) give
   J_fast[n,k,o] (per-example D'-vectors) and a[n,k,l] = d(v_{n,k} . f_n)/d s_l (gradient at
   example n's own leaf copies).
2. For each BN layer l, one batched backward pass of the 2 C_l one-hot cotangents on s_comp_l gives
   B_partial[l] = d s_l / d theta (earlier stats fixed; summed over examples) and d s_l / d s_l'
   (l' < l; summed over the per-example copies). B_total[l] = B_partial[l] + sum_{l'<l}
   (d s_l / d s_l') B_total[l'], in forward order.
3. g[n,k,o] = J_fast[n,k,o] + sum_l a[n,k,l] . B_total[l][:, o];  G_o = sum_{n,k} g g^T.

Backward passes: K + 2 sum_l C_l (cotangents), instead of N K.
Handles nn.Conv2d (groups=1, zero padding), nn.Linear (2-D input), nn.BatchNorm2d (affine), and any
parameter-free module in between; layers are assumed to run in a Sequential-like order (the basis
pass of BN l asks for the outputs recorded before it).

Implementation notes: the replaced BN output is written x * scale + shift with [N, C] scale/shift
(cheaper backward than (x - mu) / sqrt(var + eps)); the statistics use the BIASED variance, as BN
normalises with it; the native BN still runs (its running statistics update once, as in a normal
forward) and its output is discarded. In float32 the basis contractions are per-example float32
products summed over examples in float64, and the corrections and Gram products are float64
(``split_sum``): the stats-fixed part and the correction cancel to ~1/10 of their size, and all-float32
sums lost ~20x accuracy. ``basis_chunk`` bounds the basis cotangents per backward pass (memory).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnas_fast import reference
from bnas_fast.curvature import GGNBlocks


@dataclass
class Rec:
    name: str
    module: nn.Module
    input: Optional[Tensor] = None      # detached layer input
    xhat: Optional[Tensor] = None       # BN: detached normalised input
    output: Optional[Tensor] = None     # layer output in the graph (gradients are taken here)
    # train-mode BN only:
    s_comp: Optional[Tensor] = None     # [2C] = cat(mean, biased var), in the graph
    leaves: Optional[List[Tensor]] = None  # [mu_leaf [N, C], var_leaf [N, C]]


class LeafStatsGGN:
    """Context manager: records layers, makes train-mode BN statistics leaves; ``compute`` returns
    {name: [O, D', D']} in the same layout as GGNBlocks."""

    def __init__(self, model: nn.Module, nesting: bool = True, correct: bool = True, acc: Optional[torch.dtype] = None,
                 split_sum: bool = True, basis_chunk: Optional[int] = 8):
        self.model = model
        # split_sum: the basis contractions D s_l / D theta are float32 per-example products summed over the
        # examples in float64, and the corrections (a . B_total, the Gram) are float64. Without it, float32
        # blocks of the layers before a BN were 20x less accurate than the exact path's (cancellation:
        # the stats-fixed part and the correction are ~10x larger than their sum).
        self.split_sum = split_sum
        self.basis_chunk = basis_chunk  # at most this many basis cotangents per backward pass (memory bound)
        self.acc_basis_only = False  # experiment: the acc dtype for the basis contractions only
        self.acc = acc  # dtype of the contractions and corrections (None: the model's dtype)
        self.nesting, self.correct = nesting, correct  # ablations: drop step 2's recursion / all of steps 2-3
        self.records: List[Rec] = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                if isinstance(m, nn.Conv2d):
                    assert m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                self.records.append(Rec(name, m))
        self.handles = []

    def __enter__(self):
        self.order: List[Rec] = []  # forward order
        for r in self.records:
            r.input = r.xhat = r.output = r.s_comp = r.leaves = None
            self.handles.append(r.module.register_forward_hook(self._hook(r)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, r: Rec):
        def hook(module, args, output):
            x = args[0]
            r.input = x.detach()
            self.order.append(r)
            if isinstance(module, nn.BatchNorm2d) and (module.training or not module.track_running_stats):
                # The module already ran (and updated its running statistics); its output is replaced.
                N, C = x.shape[:2]
                mean = x.mean((0, 2, 3))
                var = x.var((0, 2, 3), unbiased=False)  # BN normalises with the BIASED variance
                r.s_comp = torch.cat([mean, var])
                mu_leaf = mean.detach().expand(N, C).clone().requires_grad_(True)
                var_leaf = var.detach().expand(N, C).clone().requires_grad_(True)
                r.leaves = [mu_leaf, var_leaf]
                r.xhat = ((x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + module.eps)).detach()
                # y = gamma (x - mu) / sqrt(var + eps) + beta written as x * scale + shift with [N, C] scale
                # and shift: its backward is one multiply per element for x (and a reduction for the
                # leaves), where the (x - mu) / sqrt(.) form costs several full-size elementwise ops.
                scale = module.weight * torch.rsqrt(var_leaf + module.eps)  # [N, C]
                shift = module.bias - mu_leaf * scale
                out = x * scale[:, :, None, None] + shift[:, :, None, None]
            else:
                if isinstance(module, nn.BatchNorm2d):  # eval mode: running statistics
                    r.xhat = ((x - module.running_mean[None, :, None, None])
                              / torch.sqrt(module.running_var[None, :, None, None] + module.eps)).detach()
                out = output
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
            r.output = out
            return out.clone()  # as GGNBlocks: later in-place ops change the copy
        return hook

    # -- contraction of back-propagated cotangents at a layer output with the layer's "unfolded input"
    def _contract(self, r: Rec, S: Tensor, per_example: bool) -> Tensor:
        """S [R, N, *out] -> j [R, N, O, D'] (per_example) or [R, O, D'] (summed over examples)."""
        m, x = r.module, r.input
        if self.acc is not None and not (per_example and self.acc_basis_only):
            S, x = S.to(self.acc), x.to(self.acc)
        R, N = S.shape[:2]
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, D, P]
            if m.bias is not None:
                cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)
            S = S.reshape(R, N, m.out_channels, -1)
            return torch.einsum("rnop,ndp->rnod" if per_example else "rnop,ndp->rod", S, cols)
        if isinstance(m, nn.Linear):
            assert x.dim() == 2
            cols = torch.cat([x, torch.ones_like(x[:, :1])], 1) if m.bias is not None else x
            return torch.einsum("rno,nd->rnod" if per_example else "rno,nd->rod", S, cols)
        # BatchNorm2d: depthwise 1x1 conv of xhat with bias
        xh = r.xhat.to(x.dtype).reshape(N, x.shape[1], -1)
        cols = torch.stack([xh, torch.ones_like(xh)], 2)  # [N, C, 2, P]
        S = S.reshape(R, N, x.shape[1], -1)
        return torch.einsum("rncp,ncdp->rncd" if per_example else "rncp,ncdp->rcd", S, cols)

    def compute(self, logits: Tensor) -> Dict[str, Tensor]:
        records = [r for r in self.order]
        bns = [r for r in records if r.s_comp is not None]
        outputs = [r.output for r in records]
        leaves = [t for b in bns for t in b.leaves]
        v = reference.softmax_ce_hessian_factors(logits.detach(), "exact", None, minimal=True)  # [N, K, C]
        N, K, C = v.shape
        self.backward_cotangents = K
        self.grad_calls = 1
        cdt = self.acc or (torch.float64 if self.split_sum else v.dtype)  # dtype of the corrections

        # 1. K batched cotangents: per-example factors at every layer output and at the stat leaves
        grads = torch.autograd.grad(logits, outputs + leaves, v.movedim(1, 0).contiguous(), retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        g_out, g_leaf = grads[:len(outputs)], grads[len(outputs):]
        J = {}  # name -> [K, N, O, D']
        for r, g in zip(records, g_out):
            J[r.name] = self._contract(r, g if g is not None else torch.zeros((K,) + r.output.shape, dtype=v.dtype), True)
        a = []  # per BN layer: [K, N, 2 C_l]
        for i, b in enumerate(bns):
            gm, gv = g_leaf[2 * i], g_leaf[2 * i + 1]
            zero = torch.zeros((K, N, b.leaves[0].shape[1]), dtype=v.dtype)
            a.append(torch.cat([gm if gm is not None else zero, gv if gv is not None else zero], -1).to(cdt))
        del grads, g_out, g_leaf

        # 2. basis passes: D s_l / D theta, in forward order
        B_total: List[Dict[str, Tensor]] = []
        for l, b in enumerate(bns):
            J2 = b.s_comp.shape[0]
            eye = torch.eye(J2, dtype=b.s_comp.dtype)
            earlier_leaves = [t for e in bns[:l] for t in e.leaves]
            before = records[:records.index(b)]
            self.backward_cotangents += J2
            step = self.basis_chunk or J2
            Bl: Dict[str, List[Tensor]] = {}
            gl_parts: List[List[Optional[Tensor]]] = []
            for j0 in range(0, J2, step):
                self.grad_calls += 1
                grads = torch.autograd.grad(b.s_comp, [r.output for r in before] + earlier_leaves, eye[j0:j0 + step],
                                            retain_graph=True, allow_unused=True, is_grads_batched=True)
                gb, gl = grads[:len(before)], grads[len(before):]
                for r, g in zip(before, gb):
                    if g is not None:
                        if self.split_sum:  # float32 per-example products, summed over examples in float64
                            Bl.setdefault(r.name, []).append(self._contract(r, g, True).double().sum(1))
                        else:
                            Bl.setdefault(r.name, []).append(self._contract(r, g, False))  # [step, O, D']
                # d s_l / d s_l': summed over the per-example copies
                gl_parts.append([None if t is None else t.to(cdt).sum(1) for t in gl])
                del grads, gb, gl
            Bl = {name: torch.cat(parts) for name, parts in Bl.items()}  # [2C_l, O, D']
            gl = [None if parts[0] is None else torch.cat(parts) for parts in zip(*gl_parts)] if gl_parts[0] else []
            for lp in range(l if self.nesting else 0):
                gm, gv = gl[2 * lp], gl[2 * lp + 1]
                Cp = bns[lp].leaves[0].shape[1]
                zero = torch.zeros((J2, Cp), dtype=cdt)
                dsds = torch.cat([gm if gm is not None else zero, gv if gv is not None else zero], -1)
                dsds = dsds.to(cdt)
                for name, Bp in B_total[lp].items():
                    add = torch.einsum("ij,jod->iod", dsds, Bp)
                    Bl[name] = Bl[name] + add if name in Bl else add
            B_total.append(Bl)

        # 3. corrected per-example gradients and their Gram products
        blocks = {}
        for r in records:
            g = J[r.name].to(cdt)
            for l in range(len(bns)):
                if self.correct and r.name in B_total[l]:
                    g = g + torch.einsum("knj,jod->knod", a[l], B_total[l][r.name])
            blocks[r.name] = torch.einsum("knod,knoe->ode", g, g).to(v.dtype)
        return blocks


# ----------------------------------------------------------------------------------------------

def tiny_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    )


def chunks_net():  # benchmarks/curvature_chunks.py
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def ours(model, x, **kw):
    with LeafStatsGGN(model, **kw) as c:
        logits = model(x)
    out = c.compute(logits)
    ours.cotangents, ours.grad_calls = c.backward_cotangents, c.grad_calls
    return out


def exact(model, x, **kw):
    with GGNBlocks(model) as c:
        logits = model(x)
    return c.compute(logits, "exact", couples_examples=True, **kw)


def brute_force(model, x):
    """float64 brute force (tests/test_curvature.py::_brute_force_by_rows), every supported layer."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    logits = model(x)
    N, C = logits.shape
    p = torch.softmax(logits.detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    params = [q for _, m in mods for q in (m.weight, m.bias)]
    rows = [[torch.autograd.grad(logits[n, c], params, retain_graph=True) for c in range(C)] for n in range(N)]
    out = {}
    for i, (name, m) in enumerate(mods):
        J = torch.stack([torch.stack([torch.cat([rows[n][c][2 * i].reshape(m.weight.shape[0], -1),
                                                 rows[n][c][2 * i + 1].reshape(-1, 1)], 1)
                                      for c in range(C)]) for n in range(N)])
        out[name] = torch.einsum("ncod,nce,neof->odf", J, H, J)
    return out


def check_tiny():
    torch.manual_seed(0)
    model = tiny_net().double().train()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    ref = exact(model, x)
    got = ours(model, x)
    bf = brute_force(model, x)
    print(f"## tiny float64 network (two train-mode BNs, batch 5): {ours.cotangents} cotangents (O(N)) vs "
          f"{5 * 2} (N K) exact")
    worst = 0.0
    for name in ref:
        err = ((got[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        err_bf = ((got[name] - bf[name]).abs().max() / bf[name].abs().max()).item()
        ref_bf = ((ref[name] - bf[name]).abs().max() / bf[name].abs().max()).item()
        worst = max(worst, err)
        print(f"  layer {name:>2} {str(type(model[int(name)]).__name__):12s} blocks {tuple(ref[name].shape)}: "
              f"max|ours - exact| / max|exact| = {err:.2e}   ours vs brute force {err_bf:.2e}   exact vs brute force {ref_bf:.2e}")
    # ablations: the same method without step 2's recursion, and without any correction (stats as constants)
    for label, kw in (("without the nesting term (B_total = B_partial)", dict(nesting=False)),
                      ("without any statistics correction", dict(correct=False))):
        abl = ours(model, x, **kw)
        errs = ", ".join(f"{n}: {((abl[n] - ref[n]).abs().max() / ref[n].abs().max()).item():.1e}" for n in ref)
        print(f"  ablation {label}: rel err per layer {errs}")
    return worst


def check_chunks_float64():
    torch.manual_seed(0)
    model = chunks_net().double().train()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    ref = exact(model, x)
    got = ours(model, x)
    print("## curvature_chunks network in float64, batch 8 (extra check)")
    for name in ref:
        err = ((got[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        print(f"  layer {name}: rel err {err:.2e}")


def time_chunks():
    torch.manual_seed(0)
    model = chunks_net().train()
    x = torch.randn(32, 1, 28, 28)
    fns = {"exact O(N^2): GGNBlocks.compute(couples_examples=True), default max_factor_bytes": lambda: exact(model, x),
           "leaf-statistics O(N) prototype, basis_chunk=8 (default)": lambda: ours(model, x),
           "leaf-statistics O(N) prototype, basis_chunk=None (one pass per BN)": lambda: ours(model, x, basis_chunk=None)}
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():  # interleaved
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ref, got = exact(model, x), ours(model, x)
    print("## curvature_chunks network: float32, batch 32, exact mode, 1 thread, median of 3 (forward included)")
    for k in fns:
        print(f"  {k}: {statistics.median(times[k]):.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[k])})")
    from bnas_fast.curvature import MAX_FACTOR_BYTES
    with GGNBlocks(model) as c:
        model(x)
    per_factor = sum(r.output.numel() * r.output.element_size() for r in c.records)
    chunk = max(1, MAX_FACTOR_BYTES // per_factor)
    print(f"  backward cotangents: exact N K = {32 * 9} in {-(-288 // chunk)} batched autograd.grad calls of <= {chunk}; "
          f"prototype K + 2 sum C_l = {ours.cotangents} in {ours.grad_calls} calls (basis_chunk=8)")
    names = list(fns)
    for k in names[1:]:
        print(f"  speed-up of {k.split(',')[1].strip()}: {statistics.median(times[names[0]]) / statistics.median(times[k]):.2f}x")
    for name in ref:
        err = ((got[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        print(f"  float32 agreement layer {name}: rel err {err:.2e}")
    try:
        from bnas_fast.bench import peak_memory_bytes
        for k, f in fns.items():
            print(f"  peak memory {k}: {peak_memory_bytes(f) / 2**20:.0f} MiB")
    except Exception as e:  # optional
        print("  peak memory: not measured:", e)


def accuracy_f32():
    """float32 blocks of both methods against the float64 exact path (same weights and inputs)."""
    import copy
    torch.manual_seed(0)
    model = chunks_net().train()
    x = torch.randn(32, 1, 28, 28)
    truth = exact(copy.deepcopy(model).double(), x.double())
    e32, o32, o32_plain = exact(model, x), ours(model, x), ours(model, x, split_sum=False)
    print("## float32 accuracy on the curvature_chunks network (batch 32): max|blocks - float64 exact| / max|float64 exact|")
    for name, t in truth.items():
        rel = lambda b: ((b.double() - t).abs().max() / t.abs().max()).item()
        print(f"  layer {name}: exact path {rel(e32[name]):.1e}   prototype {rel(o32[name]):.1e}   "
              f"prototype with all-float32 basis sums (split_sum=False) {rel(o32_plain[name]):.1e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    check_tiny()
    check_chunks_float64()
    accuracy_f32()
    if "--no-timing" not in sys.argv:
        time_chunks()
