"""Full fine-tuning: every parameter trains (the baseline HFT is compared with)."""

from hft_ray.train.methods.base import Method


class FullFineTuning(Method):
    kind = "fft"

    def __init__(self, config: dict, stage, job):
        pass

    def describe(self) -> dict:
        return {"kind": "fft", "trained": "all"}
