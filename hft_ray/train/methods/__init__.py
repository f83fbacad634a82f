"""The fine-tuning methods a stage can use, by the `kind` the pipeline file gives them."""

from hft_ray.train.methods.base import Method
from hft_ray.train.methods.fft import FullFineTuning
from hft_ray.train.methods.hft import HalfFineTuning
from hft_ray.train.methods.lora import LoRA

# joint trains every parameter like FFT: what differs is its data (hft_ray/run/planner.py).
METHODS: dict[str, type[Method]] = {"fft": FullFineTuning, "joint": FullFineTuning, "hft": HalfFineTuning,
                                    "lora": LoRA}


def build_method(stage, job) -> Method:
    """The method of `stage` (its `method` dict, as hft_ray.run.planner writes it)."""
    return METHODS[stage.method["kind"]](stage.method, stage, job)
