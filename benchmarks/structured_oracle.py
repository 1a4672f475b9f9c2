"""What can a channel ranking reach on the per-layer, removal-only CNN column of ``structured.py``?  Rankings by
the *exact* calibration loss, as references for the importances (not methods: they cost forward passes per
candidate).

On the Fashion-MNIST CNN of ``benchmarks/structured.py`` (the same cached trained networks, seeds and 1,024
calibration images), every layer (conv1 / conv2 / fc1) loses the ratio of its channels, no update:

* ``exact_single``: each channel ranked by the calibration cross-entropy after removing it alone (the best any
  per-channel saliency can approximate);
* ``exact_greedy``: channels removed one at a time, each time the one (in a layer that still has channels to
  lose) whose removal, together with those already removed, gives the lowest calibration loss -- a joint,
  non-linear reference for greedy orders such as ``OBSImportance(scope="network")``.

Removing a channel is zeroing its consumer's inputs (a channel-gate of 0), which is what Torch-Pruning's removal
does to the network's function; activations up to the changed layer are cached.  Writes
``benchmarks/results/structured_oracle.{md,json}`` (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/structured_oracle.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured as S  # noqa: E402

WIDTHS = (16, 32, 128)   # conv1, conv2, fc1 channels


class Gated:
    """The CNN as a function of one gate per channel (where its consumer reads it), activations cached."""

    def __init__(self, model, X):
        self.m = model
        with torch.no_grad():
            self.a1 = F.max_pool2d(F.relu(model.bn1(model.conv1(X))), 2)

    @torch.no_grad()
    def a2(self, g1, a1=None):
        m = self.m
        a1 = self.a1 if a1 is None else a1
        return F.max_pool2d(F.relu(m.bn2(m.conv2(a1 * g1.view(1, -1, 1, 1)))), 2).flatten(1)

    @torch.no_grad()
    def h(self, a2, g2):
        return F.relu(self.m.fc1(a2 * g2.repeat_interleave(49).view(1, -1)))

    @torch.no_grad()
    def logits(self, h, g3):
        return self.m.fc2(h * g3.view(1, -1))


@torch.no_grad()
def accuracy(model, X, y, gates):
    net = Gated(model, X)
    return float((net.logits(net.h(net.a2(gates[0]), gates[1]), gates[2]).argmax(1) == y).float().mean())


def load_seed(ap, cache_dir, seed):
    """The cached CNN of ``structured.py``'s seed (eval mode), its splits and the indices of its 1,024
    calibration images; ``ap.error`` when the network was never trained here."""
    cache = Path(cache_dir) / f"structured_cnn_seed{seed}_ep2.pt"
    if not cache.exists():
        ap.error(f"--seeds: {cache} is missing; run benchmarks/structured.py --only cnn --seed {seed} first")
    train, val, test = S.fashion(seed)
    model = S.CNN()
    model.load_state_dict(torch.load(cache))
    model.eval()
    idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed + 1))[:1024]
    return model, train, val, test, idx


def counts(ratio):
    return [w - int(w * (1 - ratio)) for w in WIDTHS]   # Torch-Pruning's per-layer rounding


def exact_single(net, y, ratio):
    ones = [torch.ones(w) for w in WIDTHS]
    a2, h = net.a2(ones[0]), None
    h = net.h(a2, ones[1])
    gates = []
    for L, (w, k) in enumerate(zip(WIDTHS, counts(ratio))):
        loss = []
        for c in range(w):
            g = torch.ones(w)
            g[c] = 0
            z = (net.logits(net.h(net.a2(g), ones[1]), ones[2]) if L == 0 else
                 net.logits(net.h(a2, g), ones[2]) if L == 1 else net.logits(h, g))
            loss.append(float(F.cross_entropy(z, y)))
        g = torch.ones(w)
        g[torch.tensor(loss).argsort()[:k]] = 0
        gates.append(g)
    return gates


def exact_greedy(net, y, ratio):
    k = counts(ratio)
    gates = [torch.ones(w) for w in WIDTHS]
    while any(int((gates[L] == 0).sum()) < k[L] for L in range(3)):
        a2 = net.a2(gates[0])
        h = net.h(a2, gates[1])
        best = None
        for L, w in enumerate(WIDTHS):
            if int((gates[L] == 0).sum()) >= k[L]:
                continue
            for c in range(w):
                if gates[L][c] == 0:
                    continue
                g = gates[L].clone()
                g[c] = 0
                z = (net.logits(net.h(net.a2(g), gates[1]), gates[2]) if L == 0 else
                     net.logits(net.h(a2, g), gates[2]) if L == 1 else net.logits(h, g))
                v = float(F.cross_entropy(z, y))
                if best is None or v < best[0]:
                    best = (v, L, c)
        gates[best[1]][best[2]] = 0
    return gates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "obs_plugins"))
    ap.add_argument("--out", default=str(S.RESULTS / "structured_oracle"))
    args = ap.parse_args(argv)
    for r in args.ratios:
        if not 0.0 < r < 1.0:
            ap.error(f"--ratios: each in (0, 1), got {r}")
    rows = []
    for seed in args.seeds:
        model, train, _val, test, idx = load_seed(ap, args.cache, seed)   # structured.py's calibration images
        net = Gated(model, train[0][idx])
        for ratio in args.ratios:
            for name, fn in (("exact_single", exact_single), ("exact_greedy", exact_greedy)):
                t0 = time.perf_counter()
                gates = fn(net, train[1][idx], ratio)
                rows.append({"seed": seed, "ratio": ratio, "ranking": name, "test": accuracy(model, *test, gates),
                             "seconds": time.perf_counter() - t0, "sha256": S.state_digest(model)})
                print(f"seed {seed} {ratio:.0%} {name}: test {rows[-1]['test']:.4f} ({rows[-1]['seconds']:.0f} s)",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))
    lines = ["# Exact-loss channel rankings on the per-layer CNN (removal only)", "",
             f"`python benchmarks/structured_oracle.py {' '.join(sys.argv[1:])}`", "",
             "| ranking | " + " | ".join(f"{r:.0%} (seeds {', '.join(map(str, args.seeds))}; mean)"
                                        for r in args.ratios) + " |", "|---|" + "---|" * len(args.ratios)]
    for name in ("exact_single", "exact_greedy"):
        cells = []
        for r in args.ratios:
            v = [z["test"] for z in rows if z["ranking"] == name and z["ratio"] == r]
            cells.append(" / ".join(f"{x:.4f}" for x in v) + f"; **{sum(v) / len(v):.4f}**")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
