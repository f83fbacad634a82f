"""LoRA as a baseline method (through peft): low-rank adapters on every linear layer of the
transformer blocks are trained, the base weights are frozen, and at the end of the stage the
adapters are merged into the weights, so a LoRA stage writes an ordinary checkpoint that the
next stage (of any method) and the evaluation load like any other."""

from __future__ import annotations

import torch

from hft_ray.train.methods.base import Method


def attach_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float = 0.0) -> torch.nn.Module:
    """`model` wrapped by peft with fresh adapters; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the adapters folded into its weights."""
    model = getattr(model, "module", model)  # unwrap DDP
    merged = model.merge_and_unload()
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged


class LoRA(Method):
    kind = "lora"
    resumable = False          # adapters are not in the resumable checkpoint: the stage starts over
    trains_everything = False

    @classmethod
    def trained_params(cls, model, entry) -> int:
        from hft_ray.core.memory import adapter_params

        return adapter_params(model, entry.r)

    @classmethod
    def fsdp_problems(cls, model, entry, key: str) -> list[str]:
        return [f"{key}: kind lora cannot run with train.strategy: fsdp (its adapters are merged into whole "
                "weights at each stage's end); use train.strategy: ddp"]

    def __init__(self, config: dict, stage, job):
        self.settings = {"r": config["r"], "alpha": config["alpha"], "dropout": config.get("dropout", 0.0)}

    def prepare(self, model, tokenizer, runtime):
        return attach_lora(model, **self.settings)

    def finish(self, model):
        return merge_lora(model)

    def describe(self) -> dict:
        return {"kind": "lora", "trained": "adapters on every linear layer, merged", **self.settings}
