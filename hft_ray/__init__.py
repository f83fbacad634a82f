"""hft-ray: Half Fine-Tuning of LLMs in several stages, orchestrated with Ray, tracked in MLflow.

The core (roles, selection, freezing, Half-Reset, the Trainer callback) is plain torch and
transformers: usable from any training loop.
"""

from hft_ray.core.freezing import AppliedPlan, apply_plan
from hft_ray.core.half_reset import half_reset
from hft_ray.core.selection import GRANULARITIES, SelectionPlan, select

__all__ = ["GRANULARITIES", "AppliedPlan", "SelectionPlan", "apply_plan", "half_reset", "select"]
