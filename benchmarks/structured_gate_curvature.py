"""Which curvature for ``OBSImportance(scope="network")``?  The choice, on the CNN's validation splits.

Three second-order models of the network loss in channel-gate coordinates (a gate per conv1 / conv2 / fc1
channel where its consumer reads it), each used greedily without the gradient term (OBD/OBS's trained-minimum
assumption) over all layers at once, then every layer loses its first channels in that order (what a
Torch-Pruning importance can express under per-layer pruning), removal only:

* ``hessian``: the exact gate Hessian of the mean calibration cross-entropy (autograd);
* ``ggn``: the Gauss-Newton matrix ``1/N sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` (the softmax Fisher; the
  curvature ``scope="network"`` uses -- computed here independently of ``obs_plugins.curvature.gates``, as a
  cross-check);
* ``fisher``: the empirical Fisher ``1/N sum_i g_i g_i^T`` of the per-sample label gradients.

The same cached CNNs, seeds and 1,024 calibration images as ``benchmarks/structured.py``; accuracy on each seed's
5,000-image validation split (the selection) and on the test set.  Writes
``benchmarks/results/structured_gate_curvature.{md,json}`` (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/structured_gate_curvature.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured as S  # noqa: E402
from structured_oracle import counts, load_seed  # noqa: E402

OFF = [0, 16, 48, 176]


def forward(m, X, gates):
    """The CNN with per-sample (or broadcast) channel gates ``(rows, 176)``."""
    a1 = F.max_pool2d(F.relu(m.bn1(m.conv1(X))), 2) * gates[:, 0:16, None, None]
    a2 = F.max_pool2d(F.relu(m.bn2(m.conv2(a1))), 2) * gates[:, 16:48, None, None]
    return m.fc2(F.relu(m.fc1(a2.flatten(1))) * gates[:, 48:176])


def curvatures(m, X, y):
    n = len(X)
    G = torch.ones(n, 176, requires_grad=True)
    F.cross_entropy(forward(m, X, G), y, reduction="sum").backward()
    A = G.grad.detach()
    out = {"fisher": A.T @ A / n}
    out["hessian"] = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(forward(m, X, v.view(1, -1)), y), torch.ones(176))
    G = torch.ones(n, 176, requires_grad=True)
    z = forward(m, X, G)
    J = torch.stack([torch.autograd.grad(z[:, c].sum(), G, retain_graph=True)[0] for c in range(10)], 1)
    p = z.detach().softmax(1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    out["ggn"] = torch.einsum("nci,ncd,ndj->ij", J, lam, J) / n
    return out


def greedy_order(H):
    removed = torch.zeros(H.shape[0], dtype=torch.bool)
    order = []
    for _ in range(H.shape[0]):
        cost = H @ removed.double() + 0.5 * torch.diag(H)
        cost[removed] = float("inf")
        u = int(cost.argmin())
        removed[u] = True
        order.append(u)
    return order


def gates_from(order, ratio):
    k = counts(ratio)
    g = torch.ones(176)
    done = [0, 0, 0]
    for u in order:
        L = next(i for i in range(3) if OFF[i] <= u < OFF[i + 1])
        if done[L] < k[L]:
            g[u] = 0
            done[L] += 1
    return g


@torch.no_grad()
def accuracy(m, X, y, g):
    return float(sum(int((forward(m, X[i:i + 1000], g.view(1, -1)).argmax(1) == y[i:i + 1000]).sum())
                     for i in range(0, len(X), 1000)) / len(X))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "obs_plugins"))
    ap.add_argument("--out", default=str(S.RESULTS / "structured_gate_curvature"))
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        m, train, val, test, idx = load_seed(ap, args.cache, seed)
        for p in m.parameters():
            p.requires_grad_(False)
        for name, H in curvatures(m, train[0][idx], train[1][idx]).items():
            order = greedy_order(H.double())
            for ratio in (0.3, 0.5):
                g = gates_from(order, ratio)
                rows.append({"seed": seed, "curvature": name, "ratio": ratio, "val": accuracy(m, *val, g),
                             "test": accuracy(m, *test, g)})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["# Gate-space curvature for the network-scope ranking (per-layer CNN, removal only)", "",
             "Mean over seeds " + ", ".join(map(str, args.seeds)) + "; validation (the selection) / test.", "",
             "| curvature | 30% val | 30% test | 50% val | 50% test |", "|---|---|---|---|---|"]
    for name in ("hessian", "ggn", "fisher"):
        cell = lambda r, k: sum(z[k] for z in rows if z["curvature"] == name and z["ratio"] == r) / len(args.seeds)  # noqa: E731
        lines.append(f"| {name} | {cell(0.3, 'val'):.4f} | {cell(0.3, 'test'):.4f} | {cell(0.5, 'val'):.4f} | "
                     f"{cell(0.5, 'test'):.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
