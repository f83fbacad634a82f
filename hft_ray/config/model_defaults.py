"""Settings that depend on the model: a built-in tiny model trains from scratch on character-level
suites (high rates, short rows); a pretrained one is fine-tuned (small rates, long rows)."""

from __future__ import annotations

TINY_MODEL_DEFAULTS = {"lr": 1e-3, "max_length": 64, "max_new_tokens": 16}
REAL_MODEL_DEFAULTS = {"lr": 2e-5, "max_length": 2048, "max_new_tokens": 128}
DEFAULTED = (("train", "lr"), ("train", "max_length"), ("eval", "max_new_tokens"))


def is_pretrained(source: str) -> bool:
    """Every model but the built-in tiny ones (builtin:smollm2-135m is the real SmolLM2)."""
    return not source.startswith("builtin:") or source == "builtin:smollm2-135m"


def fill_model_defaults(spec) -> tuple[str, ...]:
    """Fill the unset keys of DEFAULTED on a just-validated PipelineSpec with the model's defaults;
    the lines to print at the start: the defaults chosen for a pretrained model, and a warning for
    each rate above 1e-3 on one."""
    real = is_pretrained(spec.model.source)
    chosen = REAL_MODEL_DEFAULTS if real else TINY_MODEL_DEFAULTS
    notes = []
    for section, key in DEFAULTED:
        part = getattr(spec, section)
        if getattr(part, key) is None:
            object.__setattr__(part, key, chosen[key])  # frozen for users; filled once, at validation
            if real:
                notes.append(f"{section}.{key}: {chosen[key]:g} (the default for a pretrained model)")
    if real:
        rates = [("train.lr", spec.train.lr)]
        rates += [(f"stages.{i}.lr", stage.lr) for i, stage in enumerate(spec.stages) if stage.lr]
        notes += [f"warning: {key}: {rate:g} is above 1e-3, a rate that rewrites a pretrained model rather than "
                  "fine-tuning it (typical: 1e-5 to 2e-4)" for key, rate in rates if rate > 1e-3]
    return tuple(notes)
