"""OBS-IHT side by side with llm-compressor (vLLM project) SparseGPT and Wanda, in one run, on the same model,
the same calibration windows and the same held-out text.

SmolLM2-135M-Instruct (fp32, dequantized from the packaged GGUF by ``obs_plugins.data.load_smollm2``) is saved
once to ``benchmarks/.cache/smollm2-fp32`` for llm-compressor; the calibration and held-out windows are the very
batches ``obs_plugins.experiment.setup_smollm2`` gives our side, saved as LongTensors.  llm-compressor pins an
older transformers than ours, so it runs in its own venv (``benchmarks/.venv-llmc``, made by
``benchmarks/llmc/setup_venv.sh`` when missing) through ``benchmarks/llmc/worker.py``, one subprocess per
(method, sparsity).  Ours runs in this process through ``obs_plugins.experiment.run_rows``.

Times: theirs is the wall time of ``oneshot`` (calibration passes + pruning); ours is the layer-curvature pass
(calibration) + the prune, so both include calibration.  Ratios are ours / llm-compressor SparseGPT.

    python benchmarks/vs_llmcompressor.py                      # 50% / 70% / 2:4, T=3, 2 threads
    python benchmarks/vs_llmcompressor.py --calib 16 --eval 8 --sparsities 0.5 --threads 1   # small look
    obs-prune bench llmc --skip-ours                            # llm-compressor rows only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmc.worker import windows_sha256
from obs_plugins.experiment import dense_row, run_rows, setup_smollm2

ROOT = Path(__file__).resolve().parent
VENV_PY = ROOT / ".venv-llmc" / "bin" / "python"
WORKER = ROOT / "llmc" / "worker.py"
SETUP_VENV = ROOT / "llmc" / "setup_venv.sh"
CACHE = ROOT / ".cache"
LLMC_METHODS = {"sparsegpt": "llmc SparseGPT", "wanda": "llmc Wanda"}


def windows_of(batches: list[dict]) -> torch.Tensor:
    """The (n, seq_len) token windows behind ``causal_lm_batches`` batches (their ``input_ids``, in order)."""
    return torch.cat([b["input_ids"] for b in batches]).to(torch.long).contiguous()


def save_windows(batches: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(windows_of(batches).clone(), path)
    return path


def reordered(batches: list[dict], seed: int) -> list[dict]:
    """The same windows in a seeded random order, re-batched with the same batch size (``batches`` untouched)."""
    from obs_plugins.lm import causal_lm_batches
    w = windows_of(batches)
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
    return causal_lm_batches(w[perm].contiguous(), batches[0]["input_ids"].shape[0])


def save_model(model, tokenizer, path: Path) -> Path:
    """Save the dense fp32 model once (``save_pretrained``, safetensors) for llm-compressor to load.

    transformers marks a model loaded from GGUF as quantized and refuses to save it, although its weights are
    already dequantized fp32; so a copy without the GGUF quantization config is built, given the same state
    dict (strictly), and saved.  ``model`` itself is not changed."""
    if not (path / "config.json").exists():
        import copy
        import shutil
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        clone = type(model)(cfg).to(torch.float32)
        clone.load_state_dict(model.state_dict(), strict=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        clone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    return path


def ensure_venv() -> None:
    if not VENV_PY.exists():
        print(f"vs_llmcompressor: {VENV_PY.parent.parent} is missing; running {SETUP_VENV} ...", flush=True)
        subprocess.run(["bash", str(SETUP_VENV)], check=True)


def run_worker(model_dir: Path, calib: Path | None, evals: dict, method: str, sparsity: str, out: Path,
               threads: int, reuse: bool = False, device: str = "cpu", save_weights: Path | None = None,
               dtype: str = "float32", calib_batch_size: int | None = None) -> dict:
    if reuse and out.exists():
        res = json.loads(out.read_text())
        had = (res.get("calib") or {}).get("sha256")
        now = windows_sha256(torch.load(calib)) if calib else None
        if had and now and had != now:
            raise RuntimeError(f"--reuse-theirs: {out} was computed on other calibration windows (sha256 {had[:12]}, "
                               f"now {now[:12]}); drop --reuse-theirs or that file")
        print(f"vs_llmcompressor: reusing {out}" + ("" if had else " (from before the windows were fingerprinted: "
                                                        "not checked)"), flush=True)
        res["reused_from"] = str(out)
        res["reuse_checked"] = bool(had and now)
        return res
    cmd = [str(VENV_PY), str(WORKER), "--model-dir", str(model_dir), "--method", method, "--sparsity", sparsity,
           "--threads", str(threads), "--device", device, "--dtype", dtype, "--out", str(out)] + (["--calib", str(calib)] if calib else []) \
        + (["--save-weights", str(save_weights)] if save_weights else []) \
        + (["--calib-batch-size", str(calib_batch_size)] if calib_batch_size else [])
    for name, p in evals.items():
        cmd += ["--eval", f"{name}={p}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    print(f"vs_llmcompressor: llm-compressor {method} at {sparsity} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = out.with_suffix(".log")
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} {sparsity} failed (rc {proc.returncode}); see {log}:\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--methods", default="sparsegpt,wanda", help="llm-compressor methods: sparsegpt,wanda")
    ap.add_argument("--iterations", type=int, default=3, help="OBS-IHT iterations T (best T is reported)")
    ap.add_argument("--grad-subsets", type=int, default=1,
                    help="OBSIHTConfig.grad_subsets: each iteration's gradient on every m-th gradient batch, rotating")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-draw", type=int, default=0,
                    help="another set of calibration windows from the same texts (0: the default set); the "
                         "held-out windows are the same for every draw")
    ap.add_argument("--calib-order", type=int, default=0,
                    help="K > 0: the same calibration windows in a seeded shuffled order (seed K), on both sides; "
                         "the Grams are then equal in exact arithmetic and differ only by rounding, so a few orders "
                         "measure how far rounding alone moves each side's perplexity")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, ours and theirs")
    ap.add_argument("--skip-ours", action="store_true", help="run only the llm-compressor rows")
    ap.add_argument("--theirs-calib-batch-size", type=int, default=None,
                    help="llm-compressor's calibration batch size (default: its own, 1; ours calibrates in batches "
                         "of 4 -- the Grams are the same, the time is not)")
    ap.add_argument("--reuse-theirs", action="store_true",
                    help="reuse llm-compressor results already in benchmarks/.cache for these windows (same calib/"
                         "eval/seq-len) instead of re-running them")
    ap.add_argument("--ours", default="obs_iht_onepass,obs_iht",
                    help="our rows (obs_plugins.experiment.run_rows methods): one-pass T=1, sequential T=1 + best T")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:i]: both sides prune and evaluate there (CUDA: times are wall times of each side)")
    ap.add_argument("--sequential", default="auto", choices=["auto", "block", "sublayer"],
                    help="our calibration order (Curvature.layerwise sequential=): auto, block by block, or also "
                         "stage by stage inside each block")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/vs_llmcompressor")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in LLMC_METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {sorted(LLMC_METHODS)}")
    if args.calib_order < 0:
        ap.error(f"--calib-order: 0 (as given) or a positive seed, got {args.calib_order}")
    sparsities = [s for s in args.sparsities.split(",") if s]
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t_all = time.perf_counter()

    ensure_venv()
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, seq_len=args.seq_len, calib_draw=args.calib_draw)
    model_dir = save_model(setup.model, setup.tokenizer, CACHE / "smollm2-fp32")
    if args.calib_order:
        setup.calib = reordered(setup.calib, args.calib_order)
        setup.info["calib"] += f" (order {args.calib_order})"
    if args.device != "cpu":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            ap.error(f"--device: {args.device} asked for but torch.cuda.is_available() is False")
        setup.model.to(args.device)
    # results (and --reuse-theirs) are kept per window set and, off the CPU, per device
    work = CACHE / (f"llmc-c{args.calib}-e{args.eval}-s{args.seq_len}"
                    + (f"-d{args.calib_draw}" if args.calib_draw else "")
                    + (f"-o{args.calib_order}" if args.calib_order else "")
                    + ("" if args.device == "cpu" else "-" + args.device.replace(":", "")))
    calib_pt = save_windows(setup.calib, work / "calib.pt")
    evals = {h: save_windows(b, work / f"heldout_{h}.pt") for h, b in setup.heldout.items()}

    # the dense check: same model folder and the same perplexity protocol on both sides
    dense = dense_row(setup, progress)["ppl"]
    theirs_dense = run_worker(model_dir, None, evals, "dense", "0", work / "dense.json", args.threads,
                              args.reuse_theirs, args.device)
    rel = max(abs(theirs_dense["ppl"][h] - dense[h]) / dense[h] for h in dense)
    if rel > 1e-3:
        raise RuntimeError(f"dense perplexity differs: ours {dense}, llm-compressor venv {theirs_dense['ppl']} "
                           f"(rel {rel:.2e} > 1e-3): the model folder or the evaluation protocol does not match")
    rows = [{"sparsity": "0", "method": "dense", "ppl": dense, "measured_sparsity": 0.0, "seconds": 0.0,
             "dense_check": {"ours": dense, "theirs": theirs_dense["ppl"], "rel": rel}}]
    versions = theirs_dense["versions"]

    for sp in sparsities:
        for m in methods:
            bs = args.theirs_calib_batch_size
            r = run_worker(model_dir, calib_pt, evals, m, sp,
                           work / f"{m}_{sp.replace(':', 'of')}{f'_bs{bs}' if bs else ''}.json",
                           args.threads, args.reuse_theirs, args.device, calib_batch_size=bs)
            versions = r["versions"]
            rows.append({"sparsity": sp, "method": LLMC_METHODS[m], "ppl": r["ppl"],
                         "measured_sparsity": r["measured_sparsity"], "seconds": r["prune_seconds"],
                         "n_weights": r["n_weights"], "settings": r.get("settings"),
                         "per_weight_sparsity": r["per_weight_sparsity"],
                         "calib_batch_size": (r.get("calib") or {}).get("batch_size"),
                         **({"reused_from": r["reused_from"], "reuse_checked": r["reuse_checked"]}
                            if "reused_from" in r else {})})
            print(json.dumps(rows[-1], default=str), flush=True)
        if not args.skip_ours:
            more, curv = run_rows(setup, sp, args.ours.split(","), iterations=args.iterations, progress=progress,
                                  grad_subsets=args.grad_subsets, sequential=args.sequential)
            calib_s = (getattr(curv, "info", None) or {}).get("seconds", 0.0)
            for r in more:
                rows.append({"sparsity": sp, "method": "ours " + r["method"], "ppl": r["ppl"],
                             "measured_sparsity": r["measured_sparsity"], "seconds": r["prune_seconds"] + calib_s,
                             "prune_seconds": r["prune_seconds"], "calibration_seconds": calib_s,
                             "n_weights": len(setup.targets), "history": r.get("history"),
                             "seconds_T1": r.get("seconds_T1")})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("history", "seconds_T1")},
                                 default=str), flush=True)
    for r in rows:
        r["vs_dense"] = {h: r["ppl"][h] / dense[h] for h in dense}

    cmd = "python benchmarks/vs_llmcompressor.py " + " ".join(sys.argv[1:] if argv is None else argv)
    total = time.perf_counter() - t_all
    summary = _summary(rows, sparsities)
    lines = _markdown(rows, summary, setup, args, cmd.strip(), versions, total)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "summary": summary, "setup": setup.info, "command": cmd.strip(), "versions": versions,
         "machine": _machine(args.threads, args.device), "total_seconds": total}, indent=2, default=str))
    _plot(rows, sparsities, str(out.with_suffix(".png")))
    print("\n".join(lines))
    return 0


def _pick(rows, sp, prefix):
    hit = [r for r in rows if r["sparsity"] == sp and r["method"].startswith(prefix)]
    return hit[0] if hit else None


def _summary(rows, sparsities) -> list[dict]:
    """Per sparsity: ours / llm-compressor SparseGPT for perplexity and time (and best T vs their Wanda)."""
    out = []
    for sp in sparsities:
        sg, wa = _pick(rows, sp, "llmc SparseGPT"), _pick(rows, sp, "llmc Wanda")
        t1 = next((r for r in rows if r["sparsity"] == sp and r["method"] == "ours OBS-IHT T=1"), None)
        best = _pick(rows, sp, "ours OBS-IHT best") or t1

        def ratio(a, b, k):
            if not (a and b):
                return None
            if isinstance(a[k], dict):
                return {h: a[k][h] / b[k][h] for h in a[k]}
            return a[k] / b[k] if b[k] else None
        out.append({"sparsity": sp, "best": best["method"].removeprefix("ours OBS-IHT ") if best else None,
                    "ppl_T1_vs_sparsegpt": ratio(t1, sg, "ppl"), "ppl_best_vs_sparsegpt": ratio(best, sg, "ppl"),
                    "ppl_best_vs_wanda": ratio(best, wa, "ppl"),
                    "time_T1_vs_sparsegpt": ratio(t1, sg, "seconds"),
                    "time_best_vs_sparsegpt": ratio(best, sg, "seconds")})
    return out


def _ppl(d) -> str:
    return ", ".join(f"{h} {v:.4f}" for h, v in d.items())


def _machine(threads, device="cpu") -> str:
    where = "" if device == "cpu" else f"; pruned and evaluated on {device} ({torch.cuda.get_device_name(device)})"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch thread(s) per side, "
            f"Python {platform.python_version()}{where}")


def _markdown(rows, summary, setup, args, cmd, versions, total) -> list[str]:
    f = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    sg_settings = next((r["settings"] for r in rows if r["method"] == "llmc SparseGPT" and r.get("settings")), {})
    dc = rows[0]["dense_check"]
    texts = list(rows[0]["ppl"])
    lines = [
        f"SmolLM2-135M-Instruct (fp32 from the packaged GGUF), the {len(setup.targets)} Linear weights of "
        f"model.layers (q/k/v/o/gate/up/down; embeddings/lm_head kept); calibration {setup.info['calib']}; "
        f"held-out {setup.info['heldout']}; the same windows on both sides.", "",
        f"Machine: {_machine(args.threads, args.device)}. llm-compressor {versions.get('llmcompressor', '?')} "
        f"(compressed-tensors {versions.get('compressed-tensors', '?')}, transformers "
        f"{versions.get('transformers', '?')}, torch {versions.get('torch', '?')}) in benchmarks/.venv-llmc; "
        f"ours torch {torch.__version__}.", "",
        f"Command: `{cmd}`", "",
        f"Dense check: ours {_ppl(dc['ours'])}, llm-compressor venv {_ppl(dc['theirs'])} (largest relative "
        f"difference {dc['rel']:.1e}).", "",
        "llm-compressor settings (its defaults unless listed): "
        + ", ".join(f"{k}={sg_settings[k]}" for k in ("block_size", "dampening_frac", "targets") if k in sg_settings)
        + "; its default calibration pipeline (sequential: each decoder layer is calibrated on the outputs of the"
        " layers already pruned). Time = wall time of `oneshot` (calibration + pruning) for theirs; layer"
        " curvature (calibration) + prune for ours. Calibration batch size: theirs "
        + (", ".join(sorted({str(r["calib_batch_size"]) for r in rows if r.get("calib_batch_size")})) or "?")
        + f", ours {setup.calib[0]['input_ids'].shape[0]}.", "",
        "| sparsity | method | measured sparsity | " + " | ".join(f"ppl {h} | × dense" for h in texts)
        + " | time (s) |", "|---|---|---|" + "---|---|" * len(texts) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r['ppl'][h]:.2f} | {r['vs_dense'][h]:.3f}" for h in texts)
        lines.append(f"| {r['sparsity']} | {r['method']}{' (reused)' if r.get('reused_from') else ''} | "
                     f"{r['measured_sparsity']:.4f} | {cells} | {r['seconds']:.1f} |")
    reused = [r for r in rows if r.get("reused_from")]
    if reused:
        lines += ["", "(reused): `--reuse-theirs` took these rows, their times included, from an earlier run's files "
                  "(" + ", ".join(sorted({r["reused_from"] for r in reused})) + "); calibration windows "
                  + ("checked identical by fingerprint." if all(r["reuse_checked"] for r in reused) else
                     "not checked for the rows from before the windows were fingerprinted.")
                  + " Time ratios against them compare two runs."]
    if not args.skip_ours:
        lines += ["", "Ours / llm-compressor SparseGPT (perplexity: lower is better; time: below 1 is faster):", "",
                  "| sparsity | best T | ppl T=1 (" + " / ".join(texts) + ") | ppl best T | ppl best T / their Wanda "
                  "| time T=1 | time best T |", "|---|---|---|---|---|---|---|"]
        g = lambda d: "—" if d is None else " / ".join(f"{d[h]:.3f}" for h in texts)  # noqa: E731
        for s in summary:
            lines.append(f"| {s['sparsity']} | {s['best']} | {g(s['ppl_T1_vs_sparsegpt'])} | "
                         f"{g(s['ppl_best_vs_sparsegpt'])} | {g(s['ppl_best_vs_wanda'])} | "
                         f"{f(s['time_T1_vs_sparsegpt'], '.2f')} | {f(s['time_best_vs_sparsegpt'], '.2f')} |")
    lines.append(f"\nTotal wall time {total:.0f} s (other jobs may have shared the cores).")
    return lines


def _plot(rows, sparsities, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [m for m in dict.fromkeys(r["method"].split(" best")[0] + (" best T" if " best" in r["method"] else "")
                                      for r in rows) if m != "dense"]
    key = lambda r: r["method"].split(" best")[0] + (" best T" if " best" in r["method"] else "")  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    text = list(rows[0]["ppl"])[-1]  # the text of another author
    width = 0.8 / max(len(names), 1)
    for i, m in enumerate(names):
        got = [[r for r in rows if r["sparsity"] == s and key(r) == m] for s in sparsities]
        xs = [j + i * width for j in range(len(sparsities))]
        axes[0].bar(xs, [g[0]["ppl"][text] if g else float("nan") for g in got], width, label=m)
        axes[1].bar(xs, [g[0]["seconds"] if g else float("nan") for g in got], width, label=m)
    axes[0].axhline(rows[0]["ppl"][text], color="k", ls="--", label="dense")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"perplexity on {text} (log)")
    axes[1].set_ylabel("time incl. calibration (s)")
    for ax in axes:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sparsities))], sparsities)
        ax.set_xlabel("sparsity")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: OBS-IHT vs llm-compressor (same model, windows, machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
