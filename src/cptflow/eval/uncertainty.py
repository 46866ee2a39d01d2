"""How far an accuracy can be trusted: binomial standard errors and a paired bootstrap of differences.

A benchmark score is a mean of n right/wrong answers, so its standard error is the binomial one,
``sqrt(p (1 - p) / n)`` (lm-evaluation-harness reports the sample form, ``sqrt(p (1 - p) / (n - 1))``: a
factor ``sqrt(n / (n - 1))`` apart, under 1 % once n > 50). A macro average over subjects has
``sqrt(sum se_s^2) / S`` (subjects are independent samples).

Two models answer the same questions, so their difference is judged per question: the paired
bootstrap resamples question indices with replacement (the same indices for both models) and reads
the interval of the mean difference from the resampled means. Pairing removes the spread that comes
from which questions happen to be easy, which two separate intervals would count twice. A difference
whose interval contains 0 is within noise. Seeded: the same seed and inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` questions (0 for n = 0)."""
    return math.sqrt(p * (1.0 - p) / n) if n else 0.0


def macro_se(ses: Sequence[float]) -> float:
    """Standard error of the unweighted mean of independent per-subject accuracies."""
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else 0.0


def paired_bootstrap(base: Sequence[int], other: Sequence[int], *, samples: int, seed: int, confidence: float,
                     chunk_rows: int = 0) -> dict[str, float | int | bool]:
    """Mean of ``other - base`` (0/1 per question, same order) with its paired-bootstrap interval.

    Resamples are drawn in chunks of index rows, so memory stays bounded for large benchmarks while
    the random stream (and so the interval) does not depend on the chunk size.
    """
    a = np.asarray(base, dtype=np.int8)
    b = np.asarray(other, dtype=np.int8)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired bootstrap needs two equally long, non-empty 0/1 vectors (got {a.shape}, {b.shape})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be between 0 and 1")
    diff = (b - a).astype(np.float64)
    n = len(diff)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = np.empty(samples)
    rows = chunk_rows or max(1, 2_000_000 // n)  # about 16 MB of int64 indices per chunk
    for start in range(0, samples, rows):
        k = min(rows, samples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start:start + k] = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"delta": round(float(diff.mean()), 6), "ci_low": round(float(lo), 6), "ci_high": round(float(hi), 6),
            "confidence": confidence, "samples": samples, "seed": seed, "n": n,
            "within_noise": bool(lo <= 0.0 <= hi)}
