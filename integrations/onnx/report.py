"""Step 6 of the flow: the verification report (markdown / JSON), the verdict on which route is faster and
why, and the latency-vs-sparsity plot."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from obs_plugins.timing import MIN_RUNS, is_faster


@dataclasses.dataclass
class Report:
    ok: bool
    outputs: list[dict]
    sparsity: list[dict]
    latency: dict          # batch -> route -> stats (+ speedup)
    best: dict             # batch -> {"route", "speedup", "verdict"}
    info: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def to_markdown(self) -> str:
        i = self.info
        lines = [f"## ONNX verification: {i.get('path')}", "",
                 f"Outputs {'match' if all(o['ok'] for o in self.outputs) else 'DO NOT match'} PyTorch "
                 f"(atol {i['atol']:g}, rtol {i['rtol']:g}); ORT {i['ort_version']}, "
                 + (f"{i['threads']} intra-op thread(s), up to {i['runs']} interleaved runs after {i['warmup']} "
                    "warm-up." if self.latency else "not timed (bench=False)."), "",
                 "| route | output | max abs err | max rel err | ok |", "|---|---|---|---|---|"]
        for o in self.outputs:
            lines.append(f"| {o['route']} | {o['index']} {tuple(o['shape'])} | {o['max_abs']:.2e} | "
                         f"{o['max_rel']:.2e} | {'yes' if o['ok'] else 'NO'} |")
        zeros = [s for s in self.sparsity if s["model_sparsity"] > 0.001]
        sp = [s for s in zeros if s.get("layer", True)]   # layer weights; an embedding's padding row is not pruning
        if zeros:
            overall = ""
            if sp and all("numel" in s for s in sp):   # by weights, beside the per-layer mean (they differ
                n = sum(s["numel"] for s in sp)         # wherever layers got different sparsities)
                onnx_z = sum((s["onnx_sparsity"] or 0.0) * s["numel"] for s in sp)
                overall = (f" (overall, by weights: {sum(s['model_sparsity'] * s['numel'] for s in sp) / n:.1%} → "
                           f"{onnx_z / n:.1%})")
            lines += ["", f"Sparsity of {len(sp)} pruned layer weights (model → ONNX): mean over layers "
                      f"{np.mean([s['model_sparsity'] for s in sp] or [0]):.1%} → "
                      f"{np.mean([s['onnx_sparsity'] for s in sp if s['onnx_sparsity'] is not None] or [0]):.1%}"
                      f"{overall}; survived (every weight holding zeros): {'yes' if all(s['ok'] for s in zeros) else 'NO'}."]
        if self.latency:
            lines += ["", "| batch | route | median ms | IQR ms | speedup vs " + i["baseline_route"] + " |",
                      "|---|---|---|---|---|"]
        for b, routes in self.latency.items():
            for r, s in routes.items():
                lines.append(f"| {b} | {r} | {s['median_ms']:.2f} | {s['q25_ms']:.2f}–{s['q75_ms']:.2f} | "
                             f"{s['speedup']:.2f}× |")
        lines.append("")
        for b, v in self.best.items():
            lines.append(f"- batch {b}: {v['verdict']}")
        return "\n".join(lines) + "\n"

    def save(self, stem) -> tuple[str, str]:
        stem = str(stem)
        for suf in (".md", ".json"):
            stem = stem.removesuffix(suf)
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".md", "w") as f:
            f.write(self.to_markdown())
        with open(stem + ".json", "w") as f:
            f.write(self.to_json())
        return stem + ".md", stem + ".json"


def route_verdict(b, st, base, min_speedup, mean_sp, has_kernel, has_baseline) -> dict:
    """``{"route", "speedup", "verdict"}`` at batch ``b`` from per-route latency stats ``st`` (each with its
    ``speedup`` over ``base``): the fastest route that :func:`obs_plugins.timing.is_faster` than ``base``, or
    ``base`` and a sentence saying why nothing beat it (``mean_sp``: mean sparsity of the pruned weights;
    ``has_kernel`` / ``has_baseline``: whether a sparse-kernel route / a dense baseline was timed)."""
    bs = st[base]
    if len(st) == 1:   # nothing was compared: say so instead of explaining a comparison never made
        how = "pass baseline= (the dense model) to time it beside " + base
        if not has_kernel:
            how += ", and export with sparse_kernel='auto' or 'on' to time the sparse-kernel route"
        return {"route": base, "speedup": 1.0, "verdict": f"only {base} was timed, so no route was compared: {how}."}
    if min(s["runs"] for s in st.values()) < MIN_RUNS:
        return {"route": base, "speedup": 1.0,
                "verdict": f"too few timed runs ({min(s['runs'] for s in st.values())}) to call any route faster "
                           f"than {base}; use runs >= {MIN_RUNS}."}
    wins = [n for n in st if n != base and is_faster(st[n], bs, min_speedup)]
    if wins:
        n = max(wins, key=lambda k: st[k]["speedup"])
        return {"route": n, "speedup": st[n]["speedup"],
                "verdict": f"fastest route: {n}, {st[n]['speedup']:.2f}× faster than {base} "
                           f"({st[n]['median_ms']:.2f} vs {bs['median_ms']:.2f} ms median)."}
    fastest = min(st, key=lambda k: st[k]["median_ms"])
    if mean_sp > 0.001:
        why = (f"unstructured sparsity ({mean_sp:.0%} of the pruned weights) at batch {b}: ORT has no fast kernel "
               "for it (a dense MatMul holding zeros costs the same; SparseToDenseMatMul is a single-threaded CSR "
               "kernel that pays only for few input rows and very high sparsity); use structured pruning"
               + (" or batch 1" if b > 1 else ""))
        if not has_kernel:   # off, or no weight reached the threshold: verify sees only that no file exists
            why += (" (the sparse-kernel route was not timed: the export wrote no sparse-kernel file, because "
                    "sparse_kernel='off' or no weight reached its threshold)")
    elif has_baseline:
        why = "the pruned model does no less work in ORT than the dense one (too little was removed, or the " \
              "removed part is not on the critical path)"
    else:
        why = "no dense baseline was timed, so this compares the pruned file's routes only (pass baseline=)"
    extra = "" if fastest == base else (f" ({fastest} measured {st[fastest]['speedup']:.2f}×, within noise: "
                                        f"IQRs overlap or < {min_speedup:.2f}×)")
    return {"route": base, "speedup": 1.0, "verdict": f"no route is faster than {base}{extra}: {why}."}


def plot(reports, path, *, labels=None, title: str = "ONNX Runtime latency vs sparsity") -> str:
    """Latency (median, IQR bars) vs mean pruned sparsity, one line per route and batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reports = list(reports)
    pts = {}
    for rep in reports:
        d = rep.to_dict() if isinstance(rep, Report) else rep
        x = d.get("info", {}).get("x", d["info"].get("mean_pruned_sparsity", 0.0))
        for b, routes in d["latency"].items():
            for r, s in routes.items():
                pts.setdefault((str(b), r), []).append((x, s["median_ms"], s["q25_ms"], s["q75_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (b, r), p in sorted(pts.items()):
        p.sort()
        xs, m, lo, hi = map(np.array, zip(*p))
        ax.errorbar(xs, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=f"{r}, batch {b}")
    ax.set_xlabel("sparsity of the pruned weights")
    ax.set_ylabel("latency, median ms (IQR bars)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
