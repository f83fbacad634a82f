"""A comparison over seeds: each method's matrices and summary metrics as mean and sample standard
deviation over its seeds, and each method against a reference as paired differences (same seed,
same data order) with a Student-t 95% interval and a sign count.

With n seeds and paired differences d_s = method_s - reference_s:

    diff = mean(d),  ci95 = diff -+ t(0.975, n - 1) * sd(d) / sqrt(n)  (sd with n - 1),
    better = the seeds where the method did better (d > 0; d < 0 for `forgetting`).

One seed gives no interval (None) and a standard deviation of 0. Plain Python and scipy's t
quantile: no Ray, no MLflow.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hft_ray.core.metrics import ForgettingMatrix
from hft_ray.errors import UserError

HIGHER_IS_BETTER = {"OP": True, "BWT": True, "FWT": True, "forgetting": False, "heldout_delta": True}


def matrices_over_seeds(matrices: Sequence[ForgettingMatrix]) -> tuple[ForgettingMatrix, ForgettingMatrix]:
    """(mean, sample std) cell by cell over the seeds' matrices, which must share their labels."""
    if not matrices:
        raise UserError("matrices_over_seeds: no matrices")
    first = matrices[0]
    for index, other in enumerate(matrices[1:], start=1):
        if (other.columns, other.rows, other.stage_domains) != (first.columns, first.rows, first.stage_domains):
            raise UserError(f"matrices_over_seeds: matrix {index} has other rows or columns than matrix 0")
    cells = [list(zip(*(m.scores[r] for m in matrices), strict=True)) for r in range(len(first.rows))]
    mean = [[statistics.fmean(cell) for cell in row] for row in cells]
    std = [[_std(cell) for cell in row] for row in cells]
    return (ForgettingMatrix(first.columns, first.rows, first.stage_domains, _rows(mean)),
            ForgettingMatrix(first.columns, first.rows, first.stage_domains, _rows(std)))


def summaries_over_seeds(summaries: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(mean, sample std) of each summary metric that every seed defines."""
    shared = [k for k in summaries[0] if all(k in s for s in summaries)] if summaries else []
    return ({k: statistics.fmean(s[k] for s in summaries) for k in shared},
            {k: _std([s[k] for s in summaries]) for k in shared})


@dataclass(frozen=True)
class Comparison:
    diff: float                                  # mean of the paired differences (method - reference)
    ci95: tuple[float, float] | None             # Student-t interval; None with one seed
    n: int                                       # seeds paired
    better: int                                  # seeds where the method did better

    @property
    def excludes_zero(self) -> bool:
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)

    def to_json(self) -> dict:
        return {"diff": self.diff, "ci95": list(self.ci95) if self.ci95 else None, "n": self.n, "better": self.better}


def paired(method: Sequence[float], reference: Sequence[float], higher_is_better: bool = True) -> Comparison:
    """The method against the reference, seed by seed (the two sequences in the same seed order)."""
    from scipy.stats import t

    if len(method) != len(reference) or not method:
        raise UserError(f"paired: {len(method)} values against {len(reference)}; give one per seed for both")
    differences = [m - r for m, r in zip(method, reference, strict=True)]
    n, diff = len(differences), statistics.fmean(differences)
    better = sum(d > 0 if higher_is_better else d < 0 for d in differences)
    if n < 2:
        return Comparison(diff, None, n, better)
    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Comparison(diff, (diff - half, diff + half), n, better)


def compare(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]], reference: str) -> dict[str, dict]:
    """{method: {metric: Comparison}} for every method but `reference`, from {seed: {method:
    summary}}, over the seeds where both have the metric."""
    methods = sorted({m for by_method in per_seed.values() for m in by_method} - {reference})
    out: dict[str, dict] = {}
    for method in methods:
        out[method] = {}
        for metric, higher in HIGHER_IS_BETTER.items():
            pairs = [(s[method][metric], s[reference][metric]) for s in per_seed.values()
                     if metric in s.get(method, {}) and metric in s.get(reference, {})]
            if pairs:
                out[method][metric] = paired([m for m, _ in pairs], [r for _, r in pairs], higher)
    return out


def in_words(method: str, reference: str, metric: str, comparison: Comparison) -> str:
    """One line a reader can act on: the difference, its interval, the sign count, and whether the
    interval excludes 0."""
    direction = "higher" if comparison.diff >= 0 else "lower"
    line = f"{method}'s {metric} is {abs(comparison.diff):.3f} {direction} than {reference}'s"
    if comparison.ci95 is None:
        return line + " (one seed: no interval)"
    lo, hi = comparison.ci95
    verdict = "the interval excludes 0" if comparison.excludes_zero else "the interval includes 0: no difference shown"
    return (f"{line} (95% CI {lo:+.3f} to {hi:+.3f}; better in {comparison.better} of {comparison.n} seeds): "
            f"{verdict}")


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _rows(rows: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in rows)
