"""Full fine-tuning: every parameter trains (the baseline HFT is compared with); and the `joint`
reference, which trains the same way on every stage's data at once (hft_ray/run/planner.py)."""

from hft_ray.train.methods.base import Method


class FullFineTuning(Method):
    kind = "fft"

    def __init__(self, config: dict, stage, job):
        pass

    def describe(self) -> dict:
        return {"kind": self.kind, "trained": "all"}


class Joint(FullFineTuning):
    kind = "joint"
    every_stage_data = True
    reference = True
