"""Structured (channel / head) pruning through Torch-Pruning: OBSImportance vs Torch-Pruning's own importances.

Two problems, no fine-tuning after pruning:

* **Fashion-MNIST CNN** -- conv(16)-BN-ReLU-pool, conv(32)-BN-ReLU-pool, fc(128), fc(10), trained here (Adam 1e-3,
  batch 128, ``--cnn-epochs`` epochs on 55k images; 5k held out of training for validation; the 10k test set is
  only reported).  ``MetaPruner(global_pruning=True)`` over the two convs and fc1 (classifier ignored).
* **MiniLM on BBC News** -- all-MiniLM-L6-v2, dense mean-pooled embeddings of the first 128 tokens, a frozen
  logistic-regression head trained on the dense train embeddings; attention heads and FFN channels pruned per
  layer (``prune_transformer``: heads of q/k/v with ``prune_num_heads``, FFN intermediate channels; hidden size,
  embeddings and pooler kept); accuracy of the frozen head on the pruned model's test embeddings.  A fixed split
  of the 2,225 articles (seed 0): 1,425 train / 300 validation / 500 test.

Importances: GroupMagnitudeImportance (L2), GroupTaylorImportance, GroupHessianImportance (Torch-Pruning 1.6, its
per-sample accumulation repaired: see ``hessian_importance``;
default group mean normaliser), OBSImportance (loss-scaled greedy OBS: the loss left after the OBS update),
OBSImportance(compensate=False) ("obs_removal": the loss-scaled removal error without the update; "obs_removal_greedy":
the joint removal error in greedy order, ``mode="greedy"``), OBSImportance(scope="network") ("obs_network": the
removal cost in the network loss, the cross-entropy's Gauss-Newton matrix in channel-gate coordinates, greedy over
all layers jointly, re-linearised in 8 rounds; "obs_network1": one model at the dense point), and for the CNN
the two learned channel rankings CSImportance / BiPImportance.

CNN allocation (``--cnn-allocation``): ``global`` (one threshold over all channels; networks of different sizes),
``layer`` (every layer loses the ratio of its channels: the same network size for every importance) or ``params``
(global, but each importance removes as many channels as keeps its network at least as large -- or with
``--params-side at-most`` at most as large -- in parameters as the per-layer network at that ratio: equal size,
each importance choosing where).  Each is run "removal only" and with the OBS update of the consumers
(``OBSImportance.step`` adds the least-squares update to any ranking).  The damping of the OBS curvature is chosen
on the validation split (OBS ranking + update at 50%), never on test.

CS / BiP (CNN only): a channel-granularity search over conv1/conv2/fc1 from the dense weights for a fixed budget
of ``--search-epochs`` passes over the training split (Adam ``--search-lr`` on the weights, batch 128, global
allocation like ``global_pruning=True``), then the learned channel scores rank the channels **of the dense model**
(the search's weights are discarded: every row prunes the same network).  CS: one search (rounds=1, the
temperature annealed 1 -> 200 over ``--cs-chunks`` equal parts of the budget, rewound to the dense weights),
used at every ratio; its penalty is chosen from ``--cs-penalty-grid``.  BiP: one search per ratio (its top-k
mask is trained at that sparsity; paper implicit gradient, SGD(momentum 0.9) on the scores); score lr x gamma
chosen from ``--bip-mask-lr-grid`` x ``--bip-gamma-grid``.  Both choices on the validation split at 50% (ranking
+ OBS update, the damping's criterion), among the settings under which Torch-Pruning removes the most channels
(it skips a layer whose channels all rank below the global threshold, and fewer channels removed would win).
BiP is also reported with the search's own weights under its final mask (the model BiP trained; one more epoch
of training than the others, so not a no-fine-tuning comparison).

Writes benchmarks/results/structured.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
IMPORTANCES = ("magnitude", "taylor", "hessian", "obs", "obs_removal", "obs_removal_greedy", "obs_network",
               "obs_network1", "cs", "bip")
OBS_NAMES = ("obs", "obs_removal", "obs_removal_greedy", "obs_network", "obs_network1")
LEARNED = ("cs", "bip")


def obs_importance(curv, imp_name, rel_damp, mode=None, logits_fn=None):
    """The OBSImportance that ranks (OBS names) or only applies the update (any other importance: the default).
    "obs": the default ranking (loss after the update; ``mode``: greedy / single); "obs_removal": the removal error
    of each channel alone (``compensate=False``); "obs_removal_greedy": the joint removal error, greedy order
    (``compensate=False, mode="greedy"``); "obs_network": the network-loss removal cost in channel-gate
    coordinates (``scope="network"``, Gauss-Newton of the classifier's cross-entropy through ``logits_fn``,
    re-linearised in 8 rounds, ``relinearize=8``); "obs_network1": the same at the dense point only
    (``relinearize=1``, the library's default; the twelfth session's rows).  The same object applies the update when asked."""
    from obs_plugins.integrations.torch_pruning import OBSImportance
    if imp_name in ("obs_network", "obs_network1"):
        return OBSImportance(curv, rel_damp=rel_damp, scope="network", logits_fn=logits_fn,
                             relinearize=1 if imp_name == "obs_network1" else 8)
    if imp_name not in ("obs_removal", "obs_removal_greedy"):
        return OBSImportance(curv, rel_damp=rel_damp, mode=mode)
    return OBSImportance(curv, rel_damp=rel_damp, compensate=False,
                         mode="greedy" if imp_name == "obs_removal_greedy" else "single")


def _tp():
    import torch_pruning as tp
    return tp


def hessian_importance():
    """Torch-Pruning's GroupHessianImportance with its per-sample accumulation working.  In Torch-Pruning 1.6.0
    ``accumulate_grad`` tests ``name not in self._accu_grad`` but stores under the parameter, so the test is always
    true and every sample *replaces* the last: the scores used one sample's squared gradient, not the mean over
    ``--hessian-samples`` (this benchmark's GroupHessian rows before the eleventh session).  The override keeps
    the class's own storage and scoring and only accumulates: the sum of squared per-sample gradients and the
    count, per parameter (the mean is formed in ``__call__``, as upstream)."""
    tp = _tp()

    class GroupHessianImportance(tp.importance.GroupHessianImportance):
        def accumulate_grad(self, model):
            for param in model.parameters():
                if param.grad is not None:
                    g2 = param.grad.detach().clone().pow(2)
                    self._accu_grad[param] = self._accu_grad[param] + g2 if param in self._accu_grad else g2
                    self._counter[param] = self._counter.get(param, 0) + 1

    return GroupHessianImportance()


def builtin_importance(name):
    tp = _tp()
    return {"magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": tp.importance.GroupTaylorImportance,
            "hessian": hessian_importance}[name]()


def fill_gradients(model, imp, batches, forward_loss, hessian_samples):
    """What Taylor / Hessian importances read: summed gradients (Taylor) or per-sample squared gradients
    accumulated in the importance (Hessian, first ``hessian_samples`` calibration samples)."""
    tp = _tp()
    model.zero_grad(set_to_none=True)
    if isinstance(imp, tp.importance.GroupHessianImportance):
        imp.zero_grad()
        seen = 0
        for b in batches:
            for i in range(len(next(iter(b.values())) if isinstance(b, dict) else b[0])):
                if seen >= hessian_samples:
                    break
                one = {k: v[i:i + 1] for k, v in b.items()} if isinstance(b, dict) else (b[0][i:i + 1], b[1][i:i + 1])
                model.zero_grad(set_to_none=True)
                forward_loss(model, one).backward()
                imp.accumulate_grad(model)
                seen += 1
        # GroupHessianImportance writes the mean squared gradient into p.grad when first called
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    else:
        for b in batches:
            (forward_loss(model, b) / len(batches)).backward()


# ================================================================================================ CNN
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def fashion(seed):
    from obs_plugins.data import load_fashion_mnist
    Xtr, ytr = load_fashion_mnist("train")
    Xte, yte = load_fashion_mnist("test")
    norm = lambda X: ((X.float() / 255.0) - 0.2860) / 0.3530  # noqa: E731
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:55000], perm[55000:]
    return (norm(Xtr[tr]).unsqueeze(1), ytr[tr]), (norm(Xtr[va]).unsqueeze(1), ytr[va]), \
        (norm(Xte).unsqueeze(1), yte)


@torch.no_grad()
def accuracy(model, X, y, bs=1000):
    model.eval()
    return sum(int((model(X[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(X), bs)) / len(X)


def train_cnn(train, epochs, seed, progress):
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    X, y = train
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=g)
        for i in tqdm(range(0, len(X), 128), desc=f"CNN epoch {ep + 1}", disable=not progress, leave=False):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cnn_search(dense, train, name, ratio, args, *, penalty=None, mask_lr=None, gamma=None):
    """A channel-granularity CS or BiP search over conv1/conv2/fc1 from a copy of ``dense``, ``--search-epochs``
    passes over the training split (batch 128, seeded order); returns the finished search (its ``model`` holds
    the search's weights: CS rewound to the dense ones, BiP its own) and its wall time."""
    from obs_plugins import BiPTrainer, ContinuousSparsifier
    m = copy.deepcopy(dense)
    params = [(m.conv1, "weight"), (m.conv2, "weight"), (m.fc1, "weight")]
    X, y = train
    g = torch.Generator().manual_seed(args.seed + 2)
    batches = []
    for _ in range(args.search_epochs):
        perm = torch.randperm(len(X), generator=g)
        batches.append([(X[perm[i:i + 128]], y[perm[i:i + 128]]) for i in range(0, len(X), 128)])
    t0 = time.perf_counter()
    if name == "cs":
        flat = [b for ep in batches for b in ep]
        n = args.cs_chunks
        parts = [flat[len(flat) * k // n:len(flat) * (k + 1) // n] for k in range(n)]
        search = ContinuousSparsifier(m, params, granularity="channel", allocation="global", rounds=1, epochs=n,
                                      penalty=penalty, final_temperature=200.0, rewind_step=0, progress=False)
        opt = torch.optim.Adam(search.param_groups(lr=args.search_lr))
        m.train()
        for part in parts:   # one temperature per part: beta = 200 ** (k / (n - 1))
            for xb, yb in part:
                loss = F.cross_entropy(m(xb), yb) + search.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                search.step()
            search.step_epoch()
        search.finish(rewind=True)
    else:
        search = BiPTrainer(m, params, sparsity=ratio, granularity="channel", allocation="global", gamma=gamma,
                            mask_lr=mask_lr, progress=False)
        opt = torch.optim.Adam(search.param_groups(args.search_lr))
        mopt = torch.optim.SGD(search.score_groups(), lr=mask_lr, momentum=0.9)
        for ep in batches:
            search.fit(ep, F.cross_entropy, epochs=1, optimizer=opt, mask_optimizer=mopt, finish=False)
        search.finish()
    m.eval()
    return search, time.perf_counter() - t0


def cnn_prune(dense, calib, ratio, imp_name, update, rel_damp, hessian_samples, search=None, weights="dense",
              global_pruning=True):
    """Prune a copy of ``dense`` (for CS / BiP: a copy of the finished ``search``'s model, with the dense weights
    loaded, or with ``weights="searched"`` BiP's own weights under its final mask); returns the pruned model and
    the wall time of scoring + pruning.  ``global_pruning=False``: every layer loses ``ratio`` of its channels,
    so every importance yields the same widths (equal parameters and MACs)."""
    tp = _tp()
    from obs_plugins import Curvature, prunable_linear_targets
    from obs_plugins.integrations.torch_pruning import BiPImportance, CSImportance
    if imp_name in LEARNED:
        search = copy.deepcopy(search)   # the search and its model together: the copy's targets are the copy's
        m = search.model
        if weights == "dense":
            m.load_state_dict(dense.state_dict())
        else:   # the model BiP trained: its mask applied (removed channels' weights and biases zero)
            with torch.no_grad():
                masks, bias = search.masks(), search.bias_masks()
                for t in search.targets:
                    t.module.weight.mul_(masks[t.key].to(t.module.weight.dtype))
                    if t.key in bias:
                        t.module.bias.mul_(bias[t.key].to(t.module.bias.dtype))
        m.eval()
    else:
        m = copy.deepcopy(dense).eval()
    t0 = time.perf_counter()
    params = [(t.module, t.name) for t in prunable_linear_targets(m, exclude=())]
    curv = Curvature.layerwise(m, params, calib, loss_fn=F.cross_entropy, progress=False)
    obs = obs_importance(curv, imp_name, rel_damp)
    if imp_name in OBS_NAMES:
        imp = obs
    elif imp_name == "cs":
        imp = CSImportance(search)
    elif imp_name == "bip":
        imp = BiPImportance(search)
    else:
        imp = builtin_importance(imp_name)
    if imp_name in ("taylor", "hessian"):
        fill_gradients(m, imp, calib, lambda mm, b: F.cross_entropy(mm(b[0]), b[1]), hessian_samples)
    pr = tp.pruner.MetaPruner(m, calib[0][0][:2], importance=imp, pruning_ratio=ratio,
                              global_pruning=global_pruning, ignored_layers=[m.fc2])
    rec = obs.step(pr, update=update, strict=False)   # counts recorded (built-in scores can tie)
    m.zero_grad(set_to_none=True)
    return m.eval(), time.perf_counter() - t0, rec


def cnn_widths(model):
    return [model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features]


def matched_ratio(dense, calib, imp_name, rel_damp, hessian_samples, target_params, ex, search=None,
                  side="at-least"):
    """``--cnn-allocation params``: global pruning (each importance decides where channels go) at the channel
    count ``k`` that leaves the *smallest network with at least* ``target_params`` parameters (``side="at-most"``:
    the largest network with at most that many), found by bisection over ``k`` (the count removed is monotone in
    ``k``: one global threshold).  Returns ``(pruning_ratio, k, params)``; ``pruning_ratio = (k - 1/2) /
    channels`` makes Torch-Pruning's ``int(channels * (1 - ratio))`` keep exactly ``channels - k``.
    When even ``k = 1`` leaves fewer than the target (many scores tie at the lowest value -- e.g. GroupHessian's
    zero scores of units inactive on its samples -- and Torch-Pruning removes every channel at the threshold),
    ``k = 1`` is returned: the importance cannot reach the target size."""
    tp = _tp()
    total = sum(cnn_widths(dense))
    seen = {}

    def params_at(k):
        if k not in seen:
            m, _, _ = cnn_prune(dense, calib, (k - 0.5) / total, imp_name, False, rel_damp, hessian_samples,
                                search=search, global_pruning=True)
            seen[k] = tp.utils.count_ops_and_params(m, ex)[1]
        return seen[k]

    lo, hi = 1, total - 1            # invariant: params(lo - 1) >= target (k = 0 is the dense model)
    if params_at(lo) < target_params:   # scores tied at the threshold: Torch-Pruning removes every tied channel
        return (lo - 0.5) / total, lo, params_at(lo)
    while lo < hi:                   # largest k with params(k) >= target
        mid = (lo + hi + 1) // 2
        if params_at(mid) >= target_params:
            lo = mid
        else:
            hi = mid - 1
    if side == "at-most" and params_at(lo) > target_params and lo + 1 < total:
        lo += 1                      # the next count is the largest network at most the target
    return (lo - 0.5) / total, lo, params_at(lo)


def state_digest(model):
    """sha256 of a model's state dict (names and bytes): the same dense model across runs, or not."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_cnn(args, log):
    tp = _tp()
    glob = args.cnn_allocation in ("global", "params")
    train, val, test = fashion(args.seed)
    t0 = time.perf_counter()
    cache = Path(args.cache) / f"structured_cnn_seed{args.seed}_ep{args.cnn_epochs}.pt"
    if cache.exists():
        dense = CNN()
        dense.load_state_dict(torch.load(cache))
        dense.eval()
        log(f"CNN loaded from {cache} (trained by an earlier run of this script); val {accuracy(dense, *val):.4f}")
    else:
        dense = train_cnn(train, args.cnn_epochs, args.seed, args.progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dense.state_dict(), cache)
        log(f"CNN trained in {time.perf_counter() - t0:.0f} s; val {accuracy(dense, *val):.4f}")
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randperm(len(train[0]), generator=g)[:args.cnn_calib]
    calib = [(train[0][idx[i:i + 128]], train[1][idx[i:i + 128]]) for i in range(0, len(idx), 128)]
    ex = test[0][:1]
    macs0, params0 = tp.utils.count_ops_and_params(dense, ex)
    res = {"dense": {"val": accuracy(dense, *val), "test": accuracy(dense, *test), "macs": macs0, "params": params0},
           "dense_sha256": state_digest(dense), "rows": [], "allocation": args.cnn_allocation}
    log(f"  CNN dense: val {res['dense']['val']:.4f} test {res['dense']['test']:.4f} sha256 "
        f"{res['dense_sha256'][:16]}")
    # --cnn-allocation params: the target size at each ratio is the per-layer network's (every layer loses the
    # ratio of its channels); each importance then prunes globally to the smallest network at least that large
    targets = {}
    if args.cnn_allocation == "params":
        for r in sorted(set(args.ratios) | {0.5}):
            m, _, _ = cnn_prune(dense, calib, r, "magnitude", False, 1e-2, args.hessian_samples,
                                global_pruning=False)
            targets[r] = tp.utils.count_ops_and_params(m, ex)[1]
        res["target_params"] = {str(r): v for r, v in targets.items()}
        log("  CNN target params (per-layer networks): " + ", ".join(f"{r:.0%}: {v}" for r, v in targets.items()))

    def ratio_for(r, name, lam_, search=None):
        if not targets:
            return r, None
        pr, k, p = matched_ratio(dense, calib, name, lam_, args.hessian_samples, targets[r], ex, search=search,
                                 side=args.params_side)
        return pr, {"k": k, "params": p, "target_params": targets[r], "side": args.params_side}
    # choose the OBS damping on validation (OBS ranking + update at 50%)
    sel = {}
    for lam in args.damp_grid:
        r05, _ = ratio_for(0.5, "obs", lam)
        m, _, _ = cnn_prune(dense, calib, r05, "obs", True, lam, args.hessian_samples, global_pruning=glob)
        sel[lam] = accuracy(m, *val)
        log(f"  CNN damping {lam:g}: val {sel[lam]:.4f}")
    lam = max(sel, key=lambda k: (sel[k], -abs(math.log10(k) + 2)))
    res["damping_val"] = {str(k): v for k, v in sel.items()}
    res["rel_damp"] = lam
    # CS / BiP: search settings chosen on validation at 50% (ranking + OBS update, the damping's criterion)
    searches, res["search"] = {}, {}
    grids = {"cs": [{"penalty": p} for p in args.cs_penalty_grid],
             "bip": [{"mask_lr": lr, "gamma": ga} for lr in args.bip_mask_lr_grid for ga in args.bip_gamma_grid]}
    for name in [n for n in args.importances if n in LEARNED]:
        tried = []
        for cfg in grids[name]:
            search, sec = cnn_search(dense, train, name, 0.5, args, **cfg)
            m, _, rec = cnn_prune(dense, calib, 0.5, name, True, lam, args.hessian_samples, search=search,
                                  global_pruning=glob)
            tried.append({**cfg, "val": accuracy(m, *val), "removed": rec["root_channels_removed"],
                          "implied": rec["implied_by_ratio"], "search_seconds": sec, "search": search})
            log(f"  CNN {name} search {cfg} ({sec:.0f} s): val {tried[-1]['val']:.4f} at 50% + update, removed "
                f"{rec['root_channels_removed']} channels (ratio implies {rec['implied_by_ratio']})")
        # Torch-Pruning skips a group whose channels all fall below the global threshold (it removes fewer than
        # the ratio implies): a setting is compared at the implied count first, then by accuracy (ties: grid order)
        best = max(tried, key=lambda t: (t["removed"], t["val"]))
        chosen = {k: best[k] for k in grids[name][0]}
        res["search"][name] = {"chosen": chosen, "grid_val": [{k: v for k, v in t.items() if k != "search"}
                                                              for t in tried],
                               "epochs": args.search_epochs, "lr": args.search_lr}
        if name == "cs":
            searches.update({("cs", r): (best["search"], best["search_seconds"]) for r in args.ratios})
        else:
            for r in args.ratios:
                searches[("bip", r)] = (best["search"], best["search_seconds"]) if r == 0.5 else \
                    cnn_search(dense, train, "bip", r, args, **chosen)
        log(f"  CNN {name}: chosen {chosen}")
    for ratio in args.ratios:
        for name in args.importances:
            variants = ["dense", "searched"] if name == "bip" else ["dense"]
            for weights in variants:
                search, search_sec = searches.get((name, ratio), (None, None))
                pr_ratio, matched = ratio_for(ratio, name, lam, search=search)
                for update in (False, True):
                    m, sec, rec = cnn_prune(dense, calib, pr_ratio, name, update, lam, args.hessian_samples,
                                            search=search, weights=weights, global_pruning=glob)
                    macs, params = tp.utils.count_ops_and_params(m, ex)
                    row = {"ratio": ratio, "importance": name, "obs_update": update, "val": accuracy(m, *val),
                           "test": accuracy(m, *test), "macs": macs, "params": params, "seconds": sec,
                           "channels_removed": rec["root_channels_removed"], "implied": rec["implied_by_ratio"],
                           "widths": cnn_widths(m), "weights": weights}
                    if matched is not None:
                        row.update(pruning_ratio=pr_ratio, matched=matched)
                    if search_sec is not None:
                        row["search_seconds"] = search_sec
                    res["rows"].append(row)
                    log(f"  CNN {ratio:.0%} {name:9s} {weights:8s} update={update!s:5s} test {row['test']:.4f} "
                        f"MACs {macs / 1e6:.2f}M params {params / 1e3:.1f}k ({sec:.1f} s)")
    return res


# ================================================================================================ MiniLM
def bbc_split(seed):
    from obs_plugins.data import load_bbc_news
    texts, labels, classes = load_bbc_news()
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {"train": perm[:1425], "val": perm[1425:1725], "test": perm[1725:]}
    return texts, torch.tensor(labels), classes, parts


def mean_pool(out, mask):
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def embed(model, enc, idx, bs=32):
    model.eval()
    out = []
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        out.append(mean_pool(model(input_ids=enc["input_ids"][j], attention_mask=enc["attention_mask"][j]),
                             enc["attention_mask"][j]))
    return torch.cat(out)


def fit_head(E, y, n_classes, weight_decay=1e-3, steps=300):
    torch.manual_seed(0)
    mu, sd = E.mean(0), E.std(0) + 1e-6
    head = nn.Linear(E.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head((E - mu) / sd), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    head.requires_grad_(False)
    return lambda Z: head((Z - mu) / sd)


def minilm_prune(dense, enc, labels, calib_idx, head, ratio, imp_name, update, rel_damp, hessian_samples,
                 mode="single"):
    from obs_plugins import Curvature, prunable_linear_targets
    from obs_plugins.integrations.torch_pruning import prune_transformer
    m = copy.deepcopy(dense).eval()
    t0 = time.perf_counter()
    batches = [{"input_ids": enc["input_ids"][calib_idx[i:i + 16]],
                "attention_mask": enc["attention_mask"][calib_idx[i:i + 16]],
                "labels": labels[calib_idx[i:i + 16]]} for i in range(0, len(calib_idx), 16)]

    def fwd(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    def loss_fn(out, b):
        return F.cross_entropy(head(mean_pool(out, b["attention_mask"])), b["labels"])

    params = [(t.module, t.name) for t in prunable_linear_targets(m, exclude=("pooler",))]
    curv = Curvature.layerwise(m, params, batches, loss_fn=loss_fn, forward_fn=fwd, progress=False)
    obs = obs_importance(curv, imp_name, rel_damp, mode,
                         logits_fn=lambda out, b: head(mean_pool(out, b["attention_mask"])))
    imp = obs if imp_name in OBS_NAMES else builtin_importance(imp_name)
    before = None
    if imp_name in ("taylor", "hessian"):
        def before(model):
            fill_gradients(model, imp, batches, lambda mm, b: loss_fn(fwd(mm, b), b), hessian_samples)
    ex = {"input_ids": enc["input_ids"][:2], "attention_mask": enc["attention_mask"][:2]}
    prune_transformer(m, ex, imp, ratio, compensation=obs, update=update, before_pass=before)
    m.zero_grad(set_to_none=True)
    return m.eval(), time.perf_counter() - t0


def run_minilm(args, log):
    tp = _tp()
    from obs_plugins.data import load_minilm
    dense, tok = load_minilm()
    texts, labels, classes, parts = bbc_split(args.seed)
    enc = tok(texts, truncation=True, max_length=128, padding="max_length", return_tensors="pt")
    t0 = time.perf_counter()
    parts = {"train": parts["train"][:args.minilm_head_train], "val": parts["val"][:args.minilm_val],
             "test": parts["test"][:args.minilm_test]}
    idx_all = parts["train"] + parts["val"] + parts["test"]
    E = embed(dense, enc, idx_all)
    n_tr, n_va = len(parts["train"]), len(parts["val"])
    Etr, Eva, Ete = E[:n_tr], E[n_tr:n_tr + n_va], E[n_tr + n_va:]
    log(f"MiniLM dense embeddings of {len(idx_all)} articles in {time.perf_counter() - t0:.0f} s")
    ytr, yva, yte = labels[parts["train"]], labels[parts["val"]], labels[parts["test"]]
    head = fit_head(Etr, ytr, len(classes))
    acc = lambda Z, y: float((head(Z).argmax(1) == y).float().mean())  # noqa: E731
    ex = {"input_ids": enc["input_ids"][:1], "attention_mask": enc["attention_mask"][:1]}
    macs0, params0 = tp.utils.count_ops_and_params(dense, ex)
    res = {"dense": {"val": acc(Eva, yva), "test": acc(Ete, yte), "macs": macs0, "params": params0}, "rows": []}
    log(f"  MiniLM dense: val {res['dense']['val']:.4f} test {res['dense']['test']:.4f}")
    g = torch.Generator().manual_seed(args.seed + 1)
    calib_idx = [parts["train"][i] for i in torch.randperm(n_tr, generator=g)[:args.minilm_calib].tolist()]
    sel = {}
    grid = args.minilm_damp_grid or args.damp_grid
    for lam in grid if len(grid) > 1 else []:
        m, _ = minilm_prune(dense, enc, labels, calib_idx, head, 0.5, "obs", True, lam, args.hessian_samples,
                            args.minilm_mode)
        sel[lam] = acc(embed(m, enc, parts["val"]), yva)
        log(f"  MiniLM damping {lam:g}: val {sel[lam]:.4f}")
    lam = max(sel, key=lambda k: (sel[k], -abs(math.log10(k) + 2))) if sel else grid[0]
    res["damping_val"] = {str(k): v for k, v in sel.items()}
    res["rel_damp"] = lam
    for ratio in args.ratios:
        for name in [n for n in args.importances if n not in LEARNED]:   # CS / BiP: CNN only
            for update in (False, True):
                m, sec = minilm_prune(dense, enc, labels, calib_idx, head, ratio, name, update, lam,
                                      args.hessian_samples, args.minilm_mode)
                macs, params = tp.utils.count_ops_and_params(m, ex)
                row = {"ratio": ratio, "importance": name, "obs_update": update,
                       "test": acc(embed(m, enc, parts["test"]), yte), "macs": macs, "params": params,
                       "seconds": sec, "heads": [int(l.attention.self.num_attention_heads) for l in m.encoder.layer],
                       "ffn": [int(l.intermediate.dense.out_features) for l in m.encoder.layer]}
                res["rows"].append(row)
                log(f"  MiniLM {ratio:.0%} {name:9s} update={update!s:5s} test {row['test']:.4f} "
                    f"MACs {macs / 1e6:.1f}M params {params / 1e6:.2f}M ({sec:.1f} s)")
    return res


# ================================================================================================ report
LABEL = {("magnitude", "dense"): "GroupMagnitude (L2)", ("taylor", "dense"): "GroupTaylor",
         ("hessian", "dense"): "GroupHessian", ("obs", "dense"): "**OBSImportance**",
         ("obs_removal", "dense"): "**OBSImportance(compensate=False)** (removal-error ranking)",
         ("obs_removal_greedy", "dense"): "**OBSImportance(compensate=False, mode='greedy')** (joint removal error)",
         ("obs_network", "dense"): "**OBSImportance(scope='network')** (network-loss Gauss-Newton, channel gates, "
                                   "8 re-linearised rounds)",
         ("obs_network1", "dense"): "OBSImportance(scope='network', relinearize=1) (dense-point model only)",
         ("cs", "dense"): "CSImportance (search's ranking)", ("bip", "dense"): "BiPImportance (search's ranking)",
         ("bip", "searched"): "BiP search's own weights (not comparable: +1 epoch of masked training)"}
SERIES = list(LABEL)   # (importance, weights) in table order; rows without "weights" prune the dense model


def _weights(z):
    return z.get("weights", "dense")


def _series(rows):
    return [s for s in SERIES if any((z["importance"], _weights(z)) == s for z in rows)]


def _search_text(res):
    out = []
    for name, info in (res.get("search") or {}).items():
        grid = "; ".join(", ".join(f"{k} {v:g}" for k, v in t.items() if k in info["chosen"]) +
                         f": {t['val']:.4f}" + (f" ({t['removed']} of {t['implied']} channels removed)"
                                                 if t.get("removed") != t.get("implied") else "")
                         for t in info["grid_val"])
        out.append(f"{ {'cs': 'CS', 'bip': 'BiP'}.get(name, name)} search: {info['epochs']} epoch(s) on the training split, Adam lr "
                   f"{info['lr']:g} on the weights; chosen on validation at 50% + OBS update, among the settings "
                   f"that remove the most channels (the implied count) ({grid}): "
                   + ", ".join(f"{k} {v:g}" for k, v in info["chosen"].items()) + ".")
    return out


def table(res, title, what):
    rows = res["rows"]
    ratios = sorted({r["ratio"] for r in rows})
    d = res["dense"]
    out = [f"### {title}", "",
           f"Dense: test {d['test']:.4f}, {d['macs'] / 1e6:.2f}M MACs, {d['params'] / 1e6:.3f}M params; OBS "
           f"damping {res['rel_damp']:g} (" + ("chosen on validation: " + ", ".join(
               f"{k}: {v:.4f}" for k, v in res["damping_val"].items()) if res["damping_val"] else
               "fixed, not selected") + ").", *(["", *_search_text(res)] if res.get("search") else []), "",
           "| importance | " + " | ".join(f"{r:.0%} removal only | {r:.0%} + OBS update" for r in ratios) + " |",
           "|---|" + "---|" * (2 * len(ratios))]
    for name, weights in _series(rows):
        cells = []
        for r in ratios:
            for upd in (False, True):
                x = [z for z in rows if z["ratio"] == r and z["importance"] == name and z["obs_update"] == upd
                     and _weights(z) == weights]
                cells.append(f"{x[0]['test']:.4f}" if x else "—")
        out.append(f"| {LABEL[name, weights]} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| ratio | importance | MACs after | params after | " + what + " | prune time (s) |")
    out.append("|---|---|---|---|---|---|")
    for z in rows:
        if z["obs_update"]:
            extra = f"heads {z['heads']}, FFN {z['ffn']}" if "heads" in z else \
                f"conv1/conv2/fc1 {z['widths']}, removed {z['channels_removed']}" + \
                (f" (ratio implies {z['implied']})" if z.get("implied") is not None else " (per layer)") + \
                (f"; {'smallest with ≥' if z['matched']['side'] == 'at-least' else 'largest with ≤'} "
                 f"{z['matched']['target_params'] / 1e6:.3f}M params" if "matched" in z else "") + \
                ("; **below the target: tied scores remove more at the smallest count**"
                 if "matched" in z and z["params"] < z["matched"]["target_params"] and
                 z["matched"]["side"] == "at-least" else "")
            imp = z["importance"] + (" (own weights)" if _weights(z) == "searched" else "")
            out.append(f"| {z['ratio']:.0%} | {imp} | {z['macs'] / 1e6:.2f}M ({z['macs'] / d['macs']:.0%}) "
                       f"| {z['params'] / 1e6:.3f}M ({z['params'] / d['params']:.0%}) | {extra} | {z['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    axes = [axes] if len(results) == 1 else axes
    for ax, (title, res) in zip(axes, results.items()):
        ratios = sorted({r["ratio"] for r in res["rows"]})
        series = _series(res["rows"])
        w = 0.8 / (2 * len(series))
        for i, (name, weights) in enumerate(series):
            for j, upd in enumerate((False, True)):
                ys = [next((z["test"] for z in res["rows"] if z["ratio"] == r and z["importance"] == name and
                            z["obs_update"] == upd and _weights(z) == weights), float("nan")) for r in ratios]
                xs = [k + (2 * i + j) * w for k in range(len(ratios))]
                tag = name + (" (own weights)" if weights == "searched" else "")
                ax.bar(xs, ys, w, label=f"{tag}{' + OBS update' if upd else ''}", color=f"C{i}",
                       alpha=1.0 if upd else 0.45)
        ax.axhline(res["dense"]["test"], color="k", ls="--", lw=1, label="dense")
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(ratios))], [f"{r:.0%}" for r in ratios])
        ax.set_ylabel("test accuracy (no fine-tuning)")
        ax.set_title(title)
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--damp-grid", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--cnn-epochs", type=int, default=2)
    ap.add_argument("--cnn-allocation", choices=["global", "layer", "params"], default="global",
                    help="global: MetaPruner(global_pruning=True), each importance decides where channels go; "
                         "layer: every layer loses the ratio of its channels (equal sizes for every importance); "
                         "params: global, but each importance removes as many channels as keeps its network at "
                         "least as large (in parameters) as the per-layer network at that ratio")
    ap.add_argument("--params-side", choices=["at-least", "at-most"], default="at-least",
                    help="--cnn-allocation params: the smallest network with at least the target parameters, or "
                         "the largest with at most (channels are whole, so sizes differ by up to one channel)")
    ap.add_argument("--cnn-calib", type=int, default=1024, help="calibration images (from the training split)")
    ap.add_argument("--minilm-calib", type=int, default=128, help="calibration articles (from the train split)")
    ap.add_argument("--minilm-mode", choices=["single", "greedy"], default="single",
                    help="OBSImportance mode for MiniLM (greedy: ~6 s per 1536-wide FFN layer on 1 thread)")
    ap.add_argument("--minilm-head-train", type=int, default=1425, help="train articles the head is fit on")
    ap.add_argument("--minilm-val", type=int, default=300)
    ap.add_argument("--minilm-test", type=int, default=500)
    ap.add_argument("--minilm-damp-grid", type=float, nargs="+", default=None,
                    help="damping grid for MiniLM (default: --damp-grid; one value = no selection)")
    ap.add_argument("--hessian-samples", type=int, default=64, help="per-sample gradients for GroupHessian")
    ap.add_argument("--only", choices=["cnn", "minilm"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "obs_plugins"),
                    help="where the trained CNN is kept between runs")
    ap.add_argument("--importances", nargs="+", choices=IMPORTANCES, default=list(IMPORTANCES),
                    help="cs / bip: CNN only (a channel search each; skipped for MiniLM)")
    ap.add_argument("--search-epochs", type=int, default=1, help="CS / BiP search budget (passes over train)")
    ap.add_argument("--search-lr", type=float, default=1e-3, help="Adam lr on the weights during the search")
    ap.add_argument("--cs-chunks", type=int, default=5, help="CS temperature steps within the search budget")
    ap.add_argument("--cs-penalty-grid", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    ap.add_argument("--bip-mask-lr-grid", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--bip-gamma-grid", type=float, nargs="+", default=[0.3, 3.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--out", default=str(RESULTS / "structured"))
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="only merge the results of earlier runs (e.g. --only cnn and --only minilm) into --out")
    ap.add_argument("--mean", nargs="+", default=None, metavar="JSON",
                    help="only average the CNN test accuracies of earlier runs (e.g. --seed 0/1/2) into --out.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.mean:
        mean_table(args.mean, out)
        return
    if args.render:
        runs = [json.loads(Path(f).read_text()) for f in args.render]
        write(out, merge_results(runs), [r["meta"] for r in runs])
        return
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    results = {}
    if args.only in (None, "cnn"):
        kind = {"global": "global", "layer": "per-layer",
                "params": "global, equal parameters"}[args.cnn_allocation]
        results[f"Fashion-MNIST CNN ({kind} channel pruning)"] = run_cnn(args, log)
    if args.only in (None, "minilm"):
        results["MiniLM on BBC News (heads + FFN channels, per layer)"] = run_minilm(args, log)
    meta = {"args": vars(args), "wall_seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "torch_pruning": _tp().__version__}
    write(out, results, [meta])
    log(f"wrote {out}.md/.json/.png")


def mean_table(files, out):
    """Mean and per-run CNN test accuracy of each importance x ratio x update over runs (e.g. seeds), and how
    often each importance is the best of its column."""
    runs = []
    for f in files:
        r = json.loads(Path(f).read_text())
        cnn = [(t, v) for t, v in r["results"].items() if "CNN" in t]
        if len(cnn) != 1:
            raise SystemExit(f"--mean: {f} holds no CNN result (run it with --only cnn)")
        runs.append((f, *cnn[0]))
    titles = {t for _, t, _ in runs}
    if len(titles) != 1:
        raise SystemExit(f"--mean: the runs are of different problems: {sorted(titles)}")
    cols = sorted({(z["ratio"], z["obs_update"]) for _, _, res in runs for z in res["rows"]})
    imps = [i for i in IMPORTANCES if any(z["importance"] == i for _, _, res in runs for z in res["rows"])]
    acc = {(f, z["importance"], z["ratio"], z["obs_update"]): z["test"] for f, _, res in runs for z in res["rows"]
           if _weights(z) == "dense"}
    head = [f"{r:.0%} {'+ OBS update' if u else 'removal only'}" for r, u in cols]
    lines = [f"# {next(iter(titles))}: test accuracy over {len(runs)} runs", "",
             "Runs: " + ", ".join(f"`{f}` (dense {res['dense']['test']:.4f}, OBS damping {res['rel_damp']:g})"
                                  for f, _, res in runs), "",
             "Mean (per run) and, in brackets, in how many runs the importance is the best of its column.", "",
             "| importance | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    best = {}
    for f, _, _ in runs:
        for c in cols:
            vals = {i: acc.get((f, i, *c)) for i in imps}
            top = max(v for v in vals.values() if v is not None)
            for i, v in vals.items():
                best[(i, c)] = best.get((i, c), 0) + (v == top)
    for i in imps:
        cells = []
        for c in cols:
            v = [acc[(f, i, *c)] for f, _, _ in runs if (f, i, *c) in acc]
            cells.append(f"{sum(v) / len(v):.4f} ({' / '.join(f'{x:.4f}' for x in v)}) [{best[(i, c)]}]")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def merge_results(runs):
    """Results of several runs; runs of the same problem (e.g. ``--only cnn`` with different ``--importances``)
    are joined row by row, which needs the same dense model and OBS damping (else an error)."""
    results = {}
    for r in runs:
        for title, res in r["results"].items():
            if title not in results:
                results[title] = copy.deepcopy(res)
                continue
            have = results[title]
            for k in ("dense", "rel_damp", "damping_val", "dense_sha256"):
                if k in have and k in res and have[k] != res[k]:
                    raise SystemExit(f"--render: the runs of {title!r} differ in {k} ({have[k]} vs {res[k]}); "
                                     "they did not prune the same model")
            keys = {(z["ratio"], z["importance"], z["obs_update"], _weights(z)) for z in have["rows"]}
            for z in res["rows"]:
                if (z["ratio"], z["importance"], z["obs_update"], _weights(z)) in keys:
                    raise SystemExit(f"--render: {title!r} has the row {z['importance']} {z['ratio']} twice")
                have["rows"].append(z)
            have.setdefault("search", {}).update(res.get("search") or {})
            if "dense_sha256" in res:
                have["dense_sha256"] = res["dense_sha256"]
    return results


def write(out, results, metas):
    Path(str(out) + ".json").write_text(json.dumps({"meta": metas[0] if len(metas) == 1 else metas,
                                                    "results": results}, indent=1))
    md = ["# Structured pruning through Torch-Pruning", "",
          "Test accuracy without fine-tuning. \"removal only\": the channels chosen by the importance are removed; "
          "\"+ OBS update\": the layers consuming them get the least-squares (OBS) update from their layer Gram "
          "(`OBSImportance.step`). Runs: " + "; ".join(
              f"`{' '.join(str(a) for a in _cmd(m['args']))}` ({m['wall_seconds'] / 60:.1f} min)" for m in metas), ""]
    for title, res in results.items():
        md.append(table(res, title, "layout"))
    Path(str(out) + ".md").write_text("\n".join(md))
    plot(results, str(out) + ".png")


def _cmd(a):
    out = ["python benchmarks/structured.py"]
    if a.get("only"):
        out += ["--only", a["only"]]
    if a.get("only") in (None, "minilm"):
        out += ["--minilm-head-train", a["minilm_head_train"], "--minilm-val", a["minilm_val"], "--minilm-test",
                a["minilm_test"], "--minilm-calib", a["minilm_calib"], "--hessian-samples", a["hessian_samples"]]
        if a.get("minilm_damp_grid"):
            out += ["--minilm-damp-grid", *a["minilm_damp_grid"]]
        if a.get("minilm_mode", "single") != "single":
            out += ["--minilm-mode", a["minilm_mode"]]
    if a.get("only") in (None, "cnn"):
        out += ["--cnn-epochs", a["cnn_epochs"], "--cnn-calib", a["cnn_calib"]]
        if a.get("cnn_allocation", "global") != "global":
            out += ["--cnn-allocation", a["cnn_allocation"]]
        if a.get("cnn_allocation") == "params" and a.get("params_side", "at-least") != "at-least":
            out += ["--params-side", a["params_side"]]
    if a.get("seed"):
        out += ["--seed", a["seed"]]
    imps = a.get("importances") or []
    if imps and list(imps) != list(IMPORTANCES):
        out += ["--importances", *imps]
    return out


if __name__ == "__main__":
    main()
