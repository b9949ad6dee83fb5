"""Comparing two samplers on the same problems: the paired difference of per-problem pass@k.

Two samplers' pass@k over the same problems are not independent samples (an easy problem is
easy for both), so the comparison is per problem: d_i = pass@k_i(A) - pass@k_i(B), and the
report is mean(d) with a 95 % interval. Two intervals are given, over problems:
- "bootstrap": percentile interval of mean(d) over `resamples` resamplings of the problems with
  replacement (the headline: no normality assumed; d is bounded and often zero);
- "t": mean(d) ± t_{0.975, m-1} · sd(d) / sqrt(m), the textbook paired t-interval.
Both treat the problems as the sample (the question is "on problems like these"); the sampling
noise within a problem is already averaged by the unbiased pass@k estimator.
"""

from __future__ import annotations

import math
from typing import Any

from eval.codegen.passk import pass_at_k
from eval.errors import UserInputError


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> dict[str, Any]:
    """mean(a_i - b_i) with a bootstrap (percentile) and a t interval over the m paired items."""
    import numpy as np
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise UserInputError(f"a paired difference needs two equally long lists of at least 2 values, "
                             f"got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise UserInputError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # [m]
    m, mean = len(d), float(d.mean())
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, m, size=(resamples, m))].mean(axis=1)  # [resamples]
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    half = float(stats.t.ppf(1 - tail, m - 1) * d.std(ddof=1) / math.sqrt(m))
    return {"mean": mean, "low": float(low), "high": float(high), "t_low": mean - half, "t_high": mean + half,
            "confidence": confidence, "resamples": resamples, "problems": m,
            "better": int((d > 0).sum()), "worse": int((d < 0).sum()), "ties": int((d == 0).sum())}


def per_problem_pass_at_k(report: dict[str, Any], sampler: str, k: int) -> dict[str, float]:
    """{task_id: pass@k} of one sampler, from an `evaluate_codegen` report's per-problem counts."""
    rows = [r for r in report["problems"] if r["sampler"] == sampler]
    if not rows:
        raise UserInputError(f"sampler {sampler!r} is not in the report (it has "
                             f"{', '.join(report['samplers'])})")
    return {r["task_id"]: pass_at_k(r["n"], r["c"], min(k, r["n"])) for r in rows}


def paired_pass_at_k(report: dict[str, Any], a: str, b: str, ks: list[int] | None = None,
                     **interval) -> dict[str, dict[str, Any]]:
    """{str(k): paired_difference of pass@k(a) - pass@k(b)} over the report's problems, for each k."""
    out = {}
    for k in ks if ks is not None else report["config"]["ks"]:
        pa, pb = per_problem_pass_at_k(report, a, k), per_problem_pass_at_k(report, b, k)
        ids = sorted(pa)
        out[str(k)] = paired_difference([pa[i] for i in ids], [pb[i] for i in ids], **interval)
    return out
