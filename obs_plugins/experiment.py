"""The LLM one-shot pruning experiment shared by the CLI main job and benchmarks/one_shot_llm.py:
SmolLM2-135M, calibration on some Shakespeare plays, perplexity on other, held-out plays."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import api
from .curvature import Curvature
from .errors import PruningInputError
from .lm import causal_lm_batches, causal_lm_loss, perplexity
from .methods.magnitude import MagnitudeConfig, WandaConfig
from .methods.obs_iht import OBSIHTConfig
from .targets import prunable_linear_targets

HELDOUT_PLAYS = ("hamlet", "macbeth", "tempest", "othello")
CALIB_PLAYS = ("as_you_like_it", "coriolanus", "cymbeline", "julius_caesar", "lear", "merchant_of_venice",
               "midsummer_nights_dream", "much_ado_about_nothing", "richard_iii", "romeo_and_juliet",
               "twelfth_night", "winters_tale")


CALIB_SOURCES = ("shakespeare", "kjv", "bbc")  # the mixed calibration set: drama, scripture, journalism
HELDOUT_TEXTS = ("shakespeare", "austen")     # held-out plays of the calibration author, and another author
WINDOW_CHARS = 12   # characters cut per window token (English BPE: ~4-5 a token; a chunk always has enough)


def window_starts(length: int, n: int, seq_len: int, draw: int = 0) -> list[int]:
    """Where :func:`text_windows` cuts its ``n`` chunks (``seq_len * WINDOW_CHARS`` characters each) from a text
    of ``length`` characters: their first characters, in order."""
    chars = seq_len * WINDOW_CHARS
    if length < n * chars:
        raise ValueError(f"n/seq_len: the text has {length} characters, {n * chars} are needed")
    if not (isinstance(draw, int) and draw >= 0):
        raise ValueError(f"draw: must be an int >= 0, got {draw!r}")
    if draw == 0:
        stride, shift = (length - chars) // max(n - 1, 1), 0
    else:
        stride = (length - chars) // n
        shift = int((draw * 0.6180339887498949) % 1.0 * stride)
    return [shift + i * stride for i in range(n)]


def text_windows(tokenizer, text: str, n: int, seq_len: int, draw: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens spread evenly over ``text``: each is the start of the tokenisation of
    a character chunk (only the chunks are tokenised, not the whole corpus).  ``draw`` > 0 shifts every window by
    the fractional part of ``draw`` times the golden ratio of the stride: another evenly spread set of windows
    from the same text (``draw=0``: the first window starts the text, the last one ends it)."""
    return windows_at(tokenizer, text, window_starts(len(text), n, seq_len, draw), seq_len)


def windows_at(tokenizer, text: str, starts, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of the ``seq_len * WINDOW_CHARS``-character chunk at each of ``starts``."""
    chars = seq_len * WINDOW_CHARS
    out = []
    for start in starts:
        ids = tokenizer(text[start:start + chars], return_tensors="pt").input_ids[0]
        if ids.numel() < seq_len:
            raise ValueError(f"seq_len: a {chars}-character chunk gave only {ids.numel()} tokens")
        out.append(ids[:seq_len])
    return torch.stack(out)


@dataclass
class LLMSetup:
    """``_onepass``: a one-pass curvature kept for the one-pass contrast row."""
    model: object
    tokenizer: object
    calib: list
    heldout: dict            # name -> batches (perplexity is reported on each)
    targets: list
    load_seconds: float
    info: dict = field(default_factory=dict)
    _onepass: object = None


def _source_text(name: str, calib_plays, heldout_plays) -> str:
    from .data import load_bbc_news, load_kjv_bible, load_shakespeare
    if name == "shakespeare":
        return load_shakespeare(list(calib_plays))
    if name == "kjv":
        return load_kjv_bible()
    if name == "bbc":
        return "\n\n".join(load_bbc_news()[0])
    raise ValueError(f"calib: unknown source {name!r}; choose from {', '.join(CALIB_SOURCES)}")


def per_source(n_calib: int, n_sources: int) -> list[int]:
    """How ``n_calib`` windows split over ``n_sources`` calibration sources (the first ones take the remainder)."""
    return [n_calib // n_sources + (i < n_calib % n_sources) for i in range(n_sources)]


def load_texts(calib_sources=CALIB_SOURCES, heldout_texts=HELDOUT_TEXTS, calib_plays=CALIB_PLAYS,
               heldout_plays=HELDOUT_PLAYS) -> tuple[dict, dict]:
    """The calibration sources' and held-out texts' raw text (seconds; no model)."""
    from .data import load_austen, load_shakespeare
    srcs = list(calib_sources)
    if not srcs:
        raise ValueError("calib_sources: give at least one source")
    held_text = {"shakespeare": lambda: load_shakespeare(list(heldout_plays)), "austen": load_austen}
    unknown = [h for h in heldout_texts if h not in held_text]
    if unknown:
        raise ValueError(f"heldout_texts: unknown {unknown}; choose from {', '.join(held_text)}")
    return ({s: _source_text(s, calib_plays, heldout_plays) for s in srcs},
            {h: held_text[h]() for h in heldout_texts})


def check_windows(calib_text: dict, held_text: dict, n_calib: int, n_eval: int, seq_len: int) -> None:
    """Refuse, naming ``calib`` / ``eval``, a window count a text cannot hold -- before any model loads."""
    chars = seq_len * WINDOW_CHARS
    need = [("calib", s, n, t) for (s, t), n in zip(calib_text.items(), per_source(n_calib, len(calib_text)))]
    need += [("eval", h, n_eval, t) for h, t in held_text.items()]
    for arg, name, n, text in need:
        if len(text) < n * chars:
            raise PruningInputError(
                f"{arg}: {n} windows of {seq_len} tokens from {name!r} need {n * chars:,} characters ({chars} a "
                f"window), it has {len(text):,}: at most {len(text) // chars} windows there at this seq_len")


def setup_smollm2(n_calib: int = 32, n_eval: int = 32, seq_len: int = 256, batch_size: int = 4,
                  calib_plays=CALIB_PLAYS, heldout_plays=HELDOUT_PLAYS, blocks: int | None = None,
                  calib_sources=CALIB_SOURCES, heldout_texts=HELDOUT_TEXTS, calib_draw: int = 0,
                  texts: tuple[dict, dict] | None = None) -> LLMSetup:
    """``calib_sources``: the calibration windows are spread over each source and interleaved (so the held-out
    calibration batches OBS-IHT chooses its steps on are mixed too); ``("shakespeare",)`` is the single-author
    set.  ``calib_draw``: another set of calibration windows from the same sources (``text_windows``' ``draw``;
    the held-out windows never change).  ``heldout_texts``: perplexity sets, never used for any choice.
    ``blocks``: prune only the Linear weights of the first ``blocks`` decoder layers (default: all 30).
    ``texts``: :func:`load_texts`' result for these sources when the caller has read them already."""
    from .data import load_smollm2
    calib_text, held_text = texts or load_texts(calib_sources, heldout_texts, calib_plays, heldout_plays)
    check_windows(calib_text, held_text, n_calib, n_eval, seq_len)   # before the model load
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    srcs = list(calib_text)
    per = per_source(n_calib, len(srcs))
    wins = [text_windows(tok, calib_text[s], n, seq_len, draw=calib_draw) for s, n in zip(srcs, per)]
    order = [w[i] for i in range(max(per)) for w in wins if i < len(w)]  # interleaved: s0, s1, s2, s0, ...
    calib = causal_lm_batches(torch.stack(order), batch_size)
    held = {h: causal_lm_batches(text_windows(tok, t, n_eval, seq_len), batch_size) for h, t in held_text.items()}
    targets = prunable_linear_targets(model, exclude=("lm_head",))
    if blocks is not None:
        if not 1 <= blocks <= len(model.model.layers):
            raise ValueError(f"blocks: must be in 1..{len(model.model.layers)}, got {blocks}")
        keep = tuple(f"model.layers.{i}." for i in range(blocks))
        targets = [t for t in targets if t.key.startswith(keep)]
    desc = {"shakespeare": f"{len(calib_plays)} Shakespeare plays", "kjv": "the King James Bible",
            "bbc": "BBC News articles"}
    held_desc = {"shakespeare": f"Shakespeare ({', '.join(heldout_plays)})", "austen": "Jane Austen's six novels"}
    return LLMSetup(model, tok, calib, held, targets, load_s,
                    {"calib": f"{n_calib}x{seq_len} tokens from " + " + ".join(desc[x] for x in srcs)
                              + (f" (draw {calib_draw})" if calib_draw else ""),
                     "heldout": "; ".join(f"{n_eval}x{seq_len} tokens of {held_desc[h]}" for h in heldout_texts)})


def sparsity_args(spec: str):
    """'0.5' -> (amount 0.5, nm None); '2:4' -> (0.5, '2:4').  A fraction outside [0, 1) or a bad N:M pattern
    raises :class:`PruningInputError` naming ``sparsity``."""
    import math
    from .masks import parse_nm
    if ":" in spec:
        try:
            n, m = parse_nm(spec)
        except PruningInputError as e:
            raise PruningInputError(f"sparsity: {str(e).removeprefix('nm: ')}") from None
        return n / m, spec
    try:
        v = float(spec)
    except ValueError:
        raise PruningInputError(f"sparsity: expected a fraction such as 0.5 or an N:M pattern such as 2:4, "
                                f"got {spec!r}") from None
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise PruningInputError(f"sparsity: a fraction must lie in [0, 1), got {spec!r}")
    return v, None


def run_rows(setup: LLMSetup, sparsity: str, methods=("magnitude", "wanda", "obs_iht"), *, iterations: int = 3,
             curvature: Curvature | None = None, progress: bool = True, step_sizes=None,
             grad_subsets: int = 1, sequential="auto") -> tuple[list[dict], Curvature]:
    """Prune the model with each method at one sparsity (restoring the dense weights in between)."""
    amount, nm = sparsity_args(sparsity)
    snap = api.snapshot(setup.targets)
    if curvature is None and any(m != "magnitude" for m in methods):
        t0 = time.perf_counter()
        curvature = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets], setup.calib,
                                        loss_fn=causal_lm_loss, sequential=sequential, progress=progress)
        curvature.info = {"seconds": time.perf_counter() - t0}
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        if method == "obs_iht_onepass":  # T=1 on Grams of the dense model (all layers in one pass), for contrast
            if getattr(setup, "_onepass", None) is None:
                setup._onepass = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets],
                                                     setup.calib, sequential=False, progress=progress)
                setup._onepass.info = {"seconds": time.perf_counter() - t0}
            t1 = time.perf_counter()
            p = api.prune(OBSIHTConfig(iterations=1, nm=nm, progress=progress), curvature=setup._onepass,
                          amount=amount)
            rows.append(_row(setup, "OBS-IHT T=1 one-pass", sparsity, p, t1, progress))
            rows[-1]["prune_seconds"] += setup._onepass.info["seconds"]  # + its calibration pass, like the others
        elif method == "magnitude":
            cfg = MagnitudeConfig(allocation="uniform", nm=nm)
            p = api.prune(cfg, targets=setup.targets, amount=amount)
            rows.append(_row(setup, "magnitude", sparsity, p, t0, progress))
        elif method == "wanda":
            p = api.prune(WandaConfig(nm=nm), curvature=curvature, amount=amount)
            rows.append(_row(setup, "Wanda", sparsity, p, t0, progress))
        elif method == "obs_iht":
            from .methods.obs_iht import solve
            kw = {"grad_subsets": grad_subsets} | ({} if step_sizes is None else {"step_sizes": tuple(step_sizes)})
            p1 = api.prune(OBSIHTConfig(iterations=1, nm=nm, progress=progress), curvature=curvature, amount=amount)
            rows.append(_row(setup, "OBS-IHT T=1", sparsity, p1, t0, progress))
            rows[-1]["seconds_T1"] = p1.report.get("seconds_T1")
            if iterations > 1:  # continue from T=1 (the dense weights are restored: the gradient is taken at
                api.restore(setup.targets, snap)  # the plan's weights through curvature overrides)
                t1 = time.perf_counter()
                p = solve(curvature, None, OBSIHTConfig(iterations=iterations, nm=nm, progress=progress, **kw),
                          initial=p1)
                p.apply(reparametrize=False)
                secs = rows[-1]["prune_seconds"] + time.perf_counter() - t1
                r = _row(setup, f"OBS-IHT best T={p.report['best_iteration']}", sparsity, p, t0, progress)
                r["prune_seconds"], r["history"] = secs, p.report["history"]
                rows.append(r)
        else:
            raise ValueError(f"methods: unknown {method!r}")
        api.restore(setup.targets, snap)
    return rows, curvature


def _row(setup, name, sparsity, plan, t0, progress):
    secs = time.perf_counter() - t0  # pruning time only: taken before the perplexity evaluation
    ppl = {h: perplexity(setup.model, b, progress=progress, desc=f"perplexity {name} ({h})")
           for h, b in setup.heldout.items()}
    zeros = sum(int((t.current() == 0).sum()) for t in setup.targets)
    total = sum(t.current().numel() for t in setup.targets)
    return {"method": name, "sparsity": sparsity, "measured_sparsity": zeros / total, "ppl": ppl,
            "prune_seconds": secs, "calibration": plan.report.get("calibration", ""),
            "calibration_stages": plan.report.get("calibration_stages")}


def dense_row(setup, progress=True) -> dict:
    ppl = {h: perplexity(setup.model, b, progress=progress, desc=f"perplexity dense ({h})")
           for h, b in setup.heldout.items()}
    return {"method": "dense", "sparsity": "0", "measured_sparsity": 0.0, "ppl": ppl, "prune_seconds": 0.0}
