"""What every fine-tuning method provides to the stage loop (hft_ray/train/stage.py):

    model = method.prepare(model, tokenizer, runtime)   # freeze, or add adapters (before DDP)
    optimizer over method.parameters(model); method.attach(optimizer, start_step)
    ... each optimizer step: method.after_step(step)
    model = method.finish(model)                        # the plain model the stage saves

and the driver asks the method's class, with the pipeline's entry for it (hft_ray/config/spec.py)
and the model's structure, what the preflight, the memory estimate, the planner and the results
need: `trained_params`, `fsdp_problems`, `worker_config` and the class flags below.

A new method is one file here and one schema entry (hft_ray/config/spec.py).
"""

from __future__ import annotations

import torch

from hft_ray.core.memory import trained_params


class Method:
    kind = ""
    resumable = True           # a mid-stage checkpoint restores it (LoRA: the stage starts over)
    trains_everything = True   # every parameter trains: the memory preflight may suggest HFT instead
    every_stage_data = False   # each stage trains on every stage's data (joint; hft_ray/run/planner.py)
    reference = False          # drawn as the reference line in the comparison plot (joint)

    @classmethod
    def trained_params(cls, model: torch.nn.Module, entry) -> int:
        """Parameters with gradients and AdamW state under `entry` (the memory estimate)."""
        return trained_params(model, None)

    @classmethod
    def fsdp_problems(cls, model: torch.nn.Module, entry, key: str) -> list[str]:
        """Why `entry` (at `key` in the pipeline) cannot train under `train.strategy: fsdp`."""
        return []

    @classmethod
    def worker_config(cls, entry, seed: int) -> dict:
        """What the workers get of `entry` (the dict `__init__` takes): its settings, not `replay`
        (the planner's: it shapes the data)."""
        return entry.model_dump(exclude={"replay"})

    def prepare(self, model: torch.nn.Module, tokenizer, runtime) -> torch.nn.Module:
        return model

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """What the optimizer holds: the parameters that require grad."""
        return [p for p in model.parameters() if p.requires_grad]

    def attach(self, optimizer: torch.optim.Optimizer, start_step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def describe(self) -> dict:
        """What the stage trains, for its selection.json."""
        return {"kind": self.kind}

    def counts(self, model: torch.nn.Module) -> dict[str, int]:
        """Parameters the optimizer updates (entries, under masks) and in all."""
        total = sum(p.numel() for p in model.parameters())
        return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "total": total}
