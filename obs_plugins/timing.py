"""Latency measurement that holds up on a shared CPU: interleaved repetitions, median and IQR, and the rule for
calling one route faster than another.  Host-independent (plain callables); the ONNX adapter and the
benchmarks use it.

    times = time_interleaved({"dense": lambda: f(x), "pruned": lambda: g(x)}, runs=20, warmup=2)
    st = {k: latency_stats(v) for k, v in times.items()}
    is_faster(st["pruned"], st["dense"])      # >= 1.05x and non-overlapping IQRs over >= 10 runs
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

MIN_SPEEDUP = 1.05     # below this a median ratio is run-to-run noise on a shared machine
MIN_RUNS = 10          # fewer timed runs give no IQR worth comparing: at 3, two identical routes were called
                       # different (one 1.13x faster) in 4 of 60 runs (a review's scratch measurement)


def time_interleaved(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 0,
                     budget_s: float | None = None) -> dict[str, list[float]]:
    """Milliseconds per call of each of ``calls``, interleaved (the order rotated each repetition) so that load
    from other processes hits every route alike.  ``warmup`` untimed rounds first; ``budget_s``: stop after
    this many seconds of timed repetitions (at least :data:`MIN_RUNS` are always run)."""
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            calls[n]()
    times = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(runs):
        if budget_s is not None and r >= MIN_RUNS and time.perf_counter() - t_start > budget_s:
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            calls[n]()
            times[n].append((time.perf_counter() - t) * 1e3)
    return times


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default ``percentile`` method)."""
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def latency_stats(times_ms) -> dict:
    """``{"median_ms", "q25_ms", "q75_ms", "runs"}`` of a list of timings in ms."""
    xs = sorted(float(t) for t in times_ms)
    return {"median_ms": float(statistics.median(xs)), "q25_ms": _percentile(xs, 25),
            "q75_ms": _percentile(xs, 75), "runs": len(xs)}


def speedup(s: dict, base: dict) -> float:
    """How many times faster ``s`` is than ``base`` by median (both :func:`latency_stats` dicts)."""
    return base["median_ms"] / s["median_ms"]


def is_faster(s: dict, base: dict, min_speedup: float = MIN_SPEEDUP, min_runs: int = MIN_RUNS) -> bool:
    """``s`` beats ``base``: at least ``min_speedup``× by median, ``s``'s 75th percentile below ``base``'s 25th
    (non-overlapping IQRs), both over at least ``min_runs`` runs."""
    return (min(s["runs"], base["runs"]) >= min_runs and speedup(s, base) >= min_speedup
            and s["q75_ms"] < base["q25_ms"])


def is_slower(s: dict, base: dict, min_speedup: float = MIN_SPEEDUP, min_runs: int = MIN_RUNS) -> bool:
    """The mirror of :func:`is_faster`: ``base`` beats ``s``."""
    return is_faster(base, s, min_speedup, min_runs)


__all__ = ["MIN_RUNS", "MIN_SPEEDUP", "is_faster", "is_slower", "latency_stats", "speedup", "time_interleaved"]
