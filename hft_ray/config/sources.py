"""What a pipeline file names as its inputs: the model, and where each domain's rows come from
(a file, a datasets dataset, or an lm-evaluation-harness task)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    source: str = Field(description="builtin:tiny-llama, builtin:smollm2-135m, a model folder, a .gguf file or a "
                                    "cached hub id")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model (off by default)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template file (relative to the pipeline file) for a model whose tokenizer "
                          "has none, or to replace its own; saved with every checkpoint's tokenizer")


class FileSource(Strict):
    path: str


class DatasetSource(Strict):
    dataset: str
    split: str = "train"
    config: str | None = None


class HarnessSource(Strict):
    """A column scored by lm-evaluation-harness (hft_ray/train/harness.py): evaluated, never trained."""

    harness: str = Field(description="the task (or group) name, e.g. mmlu, arc_easy, or one of include_path's")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(200, gt=0, description="the task's first N documents (null: all)")
    metric: str = Field("acc", description="the task's metric that fills the column: acc, acc_norm, exact_match, ...")
    include_path: str | None = Field(None, description="a folder of your own task YAML files (relative to the "
                                                       "pipeline file)")


def is_harness(domain: dict) -> bool:
    """Whether a raw domain mapping names a harness column."""
    return isinstance(domain, dict) and isinstance(domain.get("source"), dict) and "harness" in domain["source"]
