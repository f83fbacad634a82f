"""The forgetting matrix and the continual-learning metrics read from it (docs/design.md).

R has T+1 rows and one column per domain: R[0] is the base model, R[i] the scores after stage
i (1..T), all in [0, 1]; d_i is the domain of stage i. Plain Python: no torch, Ray or MLflow,
so the pipeline, the command line and tests use it alike.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hft_ray.errors import UserError

METRIC_NAMES = ("OP", "BWT", "FWT", "forgetting", "heldout_delta")


def row_labels(stage_domains: Sequence[str]) -> tuple[str, ...]:
    """("base", "1:<d_1>", ..., "T:<d_T>"): one label per matrix row."""
    return ("base", *(f"{i}:{d}" for i, d in enumerate(stage_domains, start=1)))


@dataclass(frozen=True)
class ForgettingMatrix:
    """Score on every domain (column) of the base model and after every stage (row).

    Errors (a `UserError`, which is a ValueError) name every problem, since a matrix may come
    back from a JSON artifact that someone edited.
    """

    columns: tuple[str, ...]
    rows: tuple[str, ...]
    stage_domains: tuple[str, ...]
    scores: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        problems = _problems(self.columns, self.rows, self.stage_domains, self.scores)
        if problems:
            raise UserError(*problems)

    @classmethod
    def build(
        cls,
        columns: Sequence[str],
        stage_domains: Sequence[str],
        scores: Sequence[Sequence[float]],
    ) -> ForgettingMatrix:
        """The matrix with its row labels made from `stage_domains`."""
        return cls(
            columns=tuple(columns),
            rows=row_labels(stage_domains),
            stage_domains=tuple(stage_domains),
            scores=tuple(tuple(float(v) for v in row) for row in scores),
        )

    @property
    def num_stages(self) -> int:
        """T, the number of fine-tuning stages."""
        return len(self.stage_domains)

    def score(self, row: int, domain: str) -> float:
        """R[row][domain]: row 0 is the base model, row i the scores after stage i."""
        return self.scores[row][self.columns.index(domain)]

    def to_dict(self) -> dict:
        """JSON-ready, with row and column labels (the `forgetting/<method>.json` artifact)."""
        return {
            "columns": list(self.columns),
            "rows": list(self.rows),
            "stage_domains": list(self.stage_domains),
            "scores": [list(row) for row in self.scores],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ForgettingMatrix:
        """Inverse of `to_dict`; checks the same things as the constructor."""
        missing = [k for k in ("columns", "rows", "stage_domains", "scores") if k not in data]
        if missing:
            raise UserError(f"forgetting matrix: missing key(s) {', '.join(missing)}")
        try:
            scores = tuple(tuple(float(v) for v in row) for row in data["scores"])
        except (TypeError, ValueError) as e:
            raise UserError(f"scores: {data['scores']!r} is not a list of lists of numbers ({e})") from None
        return cls(
            columns=tuple(data["columns"]),
            rows=tuple(data["rows"]),
            stage_domains=tuple(data["stage_domains"]),
            scores=scores,
        )

    def to_csv(self) -> str:
        """Header "row,<domain>,...", then one line per row label (`forgetting/<method>.csv`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["row", *self.columns])
        for label, row in zip(self.rows, self.scores, strict=True):
            writer.writerow([label, *(repr(v) for v in row)])
        return out.getvalue()


def _problems(columns, rows, stage_domains, scores) -> list[str]:
    """Every problem with a matrix's fields, each naming the field, the value and what is valid."""
    problems = []
    if not columns:
        problems.append("columns: empty; give at least one domain")
    if len(set(columns)) != len(columns):
        problems.append(f"columns: {list(columns)!r} has duplicates; each domain once")
    if not stage_domains:
        problems.append("stage_domains: empty; a matrix needs at least one stage (T >= 1)")
    unknown = [d for d in stage_domains if d not in columns]
    if unknown:
        problems.append(
            f"stage_domains: {unknown!r} not among the columns {list(columns)!r}; "
            "every trained domain needs a column"
        )
    expected_rows = row_labels(stage_domains)
    if tuple(rows) != expected_rows:
        problems.append(f"rows: {list(rows)!r} should be {list(expected_rows)!r}")
    n_rows, n_cols = len(stage_domains) + 1, len(columns)
    if len(scores) != n_rows:
        problems.append(
            f"scores: {len(scores)} rows; need T+1 = {n_rows} (base + one per stage)"
        )
    for r, row in enumerate(scores):
        if len(row) != n_cols:
            problems.append(f"scores[{r}]: {len(row)} values; need one per column ({n_cols})")
        # NaN fails both comparisons, so it is rejected too.
        bad = [v for v in row if isinstance(v, bool) or not isinstance(v, (int, float))
               or not 0.0 <= v <= 1.0]
        if bad:
            problems.append(f"scores[{r}]: {bad!r} not a number in [0, 1]")
    return problems


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary(matrix: ForgettingMatrix) -> dict[str, float]:
    """OP, BWT, FWT, forgetting and heldout_delta of a matrix, keyed by those names.

    A metric that is undefined for this matrix is left out, never reported as 0 (docs/design.md:
    "not logged rather than logged as 0"). With T stages and distinct domains these are exactly
    the formulas of docs/design.md. A domain trained more than once counts at its last stage:

    - OP: mean of R[T][j] over the distinct trained domains j.
    - BWT: mean of R[T][d_i] - R[i][d_i] over the stages i < T whose domain is not trained
      again in stages i+1..T (its last stage). With distinct domains that is T-1 terms, i.e.
      the formula's 1/(T-1). Undefined when there is no such stage (T = 1, or every earlier domain
      is retrained later).
    - FWT: mean of R[i-1][d_i] - R[0][d_i] over the stages i >= 2 that train d_i for the first
      time: at a repeat, R[i-1][d_i] already holds d_i's own training, not transfer. With
      distinct domains that is T-1 terms. Undefined when there is none (T = 1).
    - forgetting (Chaudhry): mean over the domains j whose last training stage is < T of
      max_{l = 0..T-1} R[l][j] - R[T][j]; l ranges over every earlier row, the base row 0
      included. Undefined when there is no such domain.
    - heldout_delta: mean of R[T][j] - R[0][j] over the columns never trained. Undefined when
      every column is trained.
    """
    R, d, T = matrix.scores, matrix.stage_domains, matrix.num_stages

    def at(row: int, domain: str) -> float:
        return R[row][matrix.columns.index(domain)]

    last_stage = {domain: i for i, domain in enumerate(d, start=1)}  # later stages overwrite
    first_stage = {domain: i for i, domain in reversed(list(enumerate(d, start=1)))}

    values = {
        "OP": _mean([at(T, j) for j in last_stage]),
        "BWT": _mean(
            [at(T, d[i - 1]) - at(i, d[i - 1]) for i in range(1, T) if last_stage[d[i - 1]] == i]
        ),
        "FWT": _mean(
            [
                at(i - 1, d[i - 1]) - at(0, d[i - 1])
                for i in range(2, T + 1)
                if first_stage[d[i - 1]] == i
            ]
        ),
        "forgetting": _mean(
            [max(at(row, j) for row in range(T)) - at(T, j) for j, i in last_stage.items() if i < T]
        ),
        "heldout_delta": _mean(
            [at(T, j) - at(0, j) for j in matrix.columns if j not in last_stage]
        ),
    }
    return {k: v for k, v in values.items() if v is not None}
