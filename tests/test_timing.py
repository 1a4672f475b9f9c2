"""obs_plugins.timing: known answers for the statistics, the faster/slower rule and the interleaved schedule."""
from __future__ import annotations

import numpy as np
import pytest

from obs_plugins.timing import MIN_RUNS, is_faster, is_slower, latency_stats, speedup, time_interleaved


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 30])
def test_latency_stats_match_numpy(n):
    ts = list(np.random.default_rng(n).exponential(5.0, n))
    st = latency_stats(ts)
    assert st["runs"] == n
    assert st["median_ms"] == pytest.approx(float(np.median(ts)), rel=1e-12)
    assert st["q25_ms"] == pytest.approx(float(np.percentile(ts, 25)), rel=1e-12)
    assert st["q75_ms"] == pytest.approx(float(np.percentile(ts, 75)), rel=1e-12)


def test_latency_stats_known_answer():
    assert latency_stats([4.0, 1.0, 3.0, 2.0]) == {"median_ms": 2.5, "q25_ms": 1.75, "q75_ms": 3.25, "runs": 4}


def _st(med, q25, q75, runs=10):
    return {"median_ms": med, "q25_ms": q25, "q75_ms": q75, "runs": runs}


def test_faster_needs_margin_separated_iqrs_and_runs():
    dense = _st(10, 9.8, 10.2)
    assert speedup(_st(5, 4.9, 5.1), dense) == 2.0
    assert is_faster(_st(5, 4.9, 5.1), dense)
    assert not is_faster(_st(9.7, 9.6, 9.75), dense)                 # IQRs apart, but only 1.03x
    assert not is_faster(_st(9.0, 8.0, 9.9), dense)                  # 1.11x, but the IQRs overlap
    assert not is_faster(_st(5, 4.9, 5.1, runs=MIN_RUNS - 1), _st(10, 9.8, 10.2, runs=MIN_RUNS - 1))
    assert is_faster(_st(9.7, 9.6, 9.75), dense, min_speedup=1.02)
    assert is_slower(dense, _st(5, 4.9, 5.1)) and not is_slower(_st(5, 4.9, 5.1), dense)
    assert not is_faster(dense, dense) and not is_slower(dense, dense)


def test_time_interleaved_rotates_order_and_counts():
    log = []
    calls = {k: (lambda k=k: log.append(k)) for k in "abc"}
    times = time_interleaved(calls, runs=4, warmup=1)
    assert log == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_time_interleaved_budget_keeps_min_runs():
    calls = {"a": lambda: None, "b": lambda: None}
    times = time_interleaved(calls, runs=50, budget_s=0.0)
    assert {k: len(v) for k, v in times.items()} == {"a": MIN_RUNS, "b": MIN_RUNS}
