"""Plain-text views for the terminal: a selection plan as a layer-by-role grid."""

from __future__ import annotations

from hft_ray.core.roles import ROLES
from hft_ray.core.selection import SelectionPlan


def _mark(plan: SelectionPlan, unit) -> str:
    trained = plan.unit_trained_numel(unit)
    if trained == 0:
        return "."
    if trained == unit.numel:
        return "T"
    return f"{trained / unit.numel:.2f}"[1:]  # e.g. ".50" for an element mask


def format_plan(plan: SelectionPlan, title: str = "") -> str:
    """T = trained, . = frozen, .50 = that fraction of entries trained (element masks)."""
    roles = [r for r in ROLES if any(u.role == r for u in plan.units)]
    rows: dict[str, dict[str, str]] = {}
    for unit in plan.units:
        row = "top" if unit.layer is None else f"layer {unit.layer}"
        rows.setdefault(row, {})[unit.role] = _mark(plan, unit)
    width = max(len(r) for r in roles) + 1
    lines = [
        f"{title}  model_type={plan.model_type} granularity={plan.granularity} ratio={plan.ratio} "
        f"seed={plan.seed} stage={plan.stage} select_embeddings={plan.select_embeddings}".strip(),
        "",
        f"{'':<9}" + "".join(f"{r:>{width}}" for r in roles),
    ]
    for row, marks in rows.items():
        lines.append(f"{row:<9}" + "".join(f"{marks.get(r, ''):>{width}}" for r in roles))
    fractions = plan.fractions()
    lines += ["", "trained fraction        by matrices  by parameters"]
    for name in fractions["by_params"]:
        lines.append(f"  {name:<22}{fractions['by_matrices'][name]:>11.3f}{fractions['by_params'][name]:>15.3f}")
    lines.append("T = trained, . = frozen, .NN = fraction of entries trained (element masks)")
    return "\n".join(lines)


def format_matrix(matrix, title: str = "", summary: dict[str, float] | None = None, std=None,
                  summary_std: dict[str, float] | None = None) -> str:
    """A forgetting matrix as a table: one row per stage, one column per domain; trained
    cells marked with *. With `std` (a matrix of standard deviations over seeds) each cell reads
    mean±std, and with `summary_std` each summary metric too."""
    cell = (lambda r, c: f"{matrix.scores[r][c]:.3f}±{std.scores[r][c]:.3f}") if std else (
        lambda r, c: f"{matrix.scores[r][c]:.3f}")
    width = max(8 if std is None else 13, *(len(c) + 2 for c in matrix.columns))
    label_width = max(len(r) for r in matrix.rows) + 2
    lines = [title] if title else []
    lines.append(" " * label_width + "".join(f"{c:>{width}}" for c in matrix.columns))
    for index, label in enumerate(matrix.rows):
        trained = matrix.stage_domains[index - 1] if index else None
        cells = "".join(f"{cell(index, k):>{width - 1}}{'*' if c == trained else ' '}"
                        for k, c in enumerate(matrix.columns))
        lines.append(f"{label:<{label_width}}{cells}")
    if summary:
        spread = (lambda k: f"±{summary_std[k]:.3f}" if k in summary_std else "") if summary_std else (lambda k: "")
        lines.append("  ".join((f"{k}={v:+.3f}" if k != "OP" else f"OP={v:.3f}") + spread(k)
                               for k, v in summary.items()))
    return "\n".join(lines)


def format_result(result, described: str) -> str:
    """A run's matrices (over seeds: mean±std, and then each method against the reference, in
    words). `result`: hft_ray.run.results.PipelineResult; `described`: what the columns score."""
    from hft_ray.core.seeds import in_words

    over = f"mean±std over seeds {', '.join(map(str, result.seeds))}; " if result.seeds else ""
    parts = [format_matrix(matrix, f"{method} ({over}{described}; * = trained in that stage)",
                           result.summaries[method], result.matrix_std.get(method), result.summary_std.get(method))
             for method, matrix in result.matrices.items()]
    if result.comparisons:
        lines = [f"compared with {result.reference}, seed by seed (paired; Student-t 95% intervals):"]
        lines += [f"  {in_words(method, result.reference, metric, c)}"
                  for method, by_metric in result.comparisons.items() for metric, c in by_metric.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


MEMORY_ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "AdamW state"),
               ("step_temporaries", "step temporaries"), ("activations", "activations"), ("peak", "peak"))


def format_memory(memory: dict[str, dict[str, str]], title: str) -> str:
    """The estimates side by side: a row per part, a column per method."""
    methods = list(memory)
    lines = [title, f"{'':18}" + "".join(f"{m:>22}" for m in methods)]
    for key, label in MEMORY_ROWS:
        lines.append(f"{label:18}" + "".join(f"{memory[m][key]:>22}" for m in methods))
    return "\n".join(lines)
