"""The fine-tuning methods a stage can use, by the `kind` the pipeline file gives them."""

from hft_ray.train.methods.base import Method
from hft_ray.train.methods.fft import FullFineTuning, Joint
from hft_ray.train.methods.hft import HalfFineTuning
from hft_ray.train.methods.lora import LoRA

METHODS: dict[str, type[Method]] = {m.kind: m for m in (FullFineTuning, Joint, HalfFineTuning, LoRA)}


def method_class(kind: str) -> type[Method]:
    return METHODS[kind]


def build_method(stage, job) -> Method:
    """The method of `stage` (its `method` dict, as hft_ray.run.planner writes it)."""
    return METHODS[stage.method["kind"]](stage.method, stage, job)
