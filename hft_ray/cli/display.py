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


def format_matrix(matrix, title: str = "", summary: dict[str, float] | None = None) -> str:
    """A forgetting matrix as a table: one row per stage, one column per domain; trained
    cells marked with *."""
    width = max(8, *(len(c) + 2 for c in matrix.columns))
    label_width = max(len(r) for r in matrix.rows) + 2
    lines = [title] if title else []
    lines.append(" " * label_width + "".join(f"{c:>{width}}" for c in matrix.columns))
    for index, (label, row) in enumerate(zip(matrix.rows, matrix.scores, strict=True)):
        trained = matrix.stage_domains[index - 1] if index else None
        cells = "".join(f"{score:>{width - 1}.3f}{'*' if c == trained else ' '}"
                        for c, score in zip(matrix.columns, row, strict=True))
        lines.append(f"{label:<{label_width}}{cells}")
    if summary:
        lines.append("  ".join(f"{k}={v:+.3f}" if k != "OP" else f"OP={v:.3f}" for k, v in summary.items()))
    return "\n".join(lines)


MEMORY_ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "AdamW state"),
               ("step_temporaries", "step temporaries"), ("activations", "activations"), ("peak", "peak"))


def format_memory(memory: dict[str, dict[str, str]], title: str) -> str:
    """The estimates side by side: a row per part, a column per method."""
    methods = list(memory)
    lines = [title, f"{'':18}" + "".join(f"{m:>22}" for m in methods)]
    for key, label in MEMORY_ROWS:
        lines.append(f"{label:18}" + "".join(f"{memory[m][key]:>22}" for m in methods))
    return "\n".join(lines)
