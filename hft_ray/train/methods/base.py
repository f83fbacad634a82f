"""What every fine-tuning method provides to the stage loop (hft_ray/train/stage.py):

    model = method.prepare(model, tokenizer, runtime)   # freeze, or add adapters (before DDP)
    optimizer over method.parameters(model); method.attach(optimizer, start_step)
    ... each optimizer step: method.after_step(step)
    model = method.finish(model)                        # the plain model the stage saves

A new method is one file here and one schema entry (hft_ray/config/spec.py).
"""

from __future__ import annotations

import torch


class Method:
    kind = ""
    resumable = True           # a mid-stage checkpoint restores it (LoRA: the stage starts over)

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
