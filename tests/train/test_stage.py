"""A stage in this process, without Ray (`fit_stage`, the code every worker group runs): with
`reselect_every: K` the tensors that train change every K steps, to the stage's next plan."""

import pytest
import torch

import hft_ray.train.stage as stage_module
from hft_ray.core.selection import model_units, plan_units
from hft_ray.data.loading import load_domain
from hft_ray.train.channel import LocalChannel
from hft_ray.train.job import BranchJob, StageJob
from hft_ray.train.models import char_tokenizer, load_model
from hft_ray.train.runtime import Runtime

EVERY, STEPS, SEED, STAGE = 3, 9, 4, 2


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reselect_every", [EVERY, 0])
def test_reselect_every_trains_the_stages_next_plan_every_k_steps(tmp_path, monkeypatch, reselect_every):
    """The weights at steps 0, 3, 6 and 9 of a 9-step HFT stage: in each 3-step window exactly
    the tensors of that period's plan moved (plan_units(..., period=p)), and the plans differ.
    Without reselect_every, the stage's one plan trains in every window."""
    model = load_model("builtin:tiny-llama", seed=0)
    examples = tuple(load_domain("upper", "builtin:upper", seed=0, train_size=64).train)
    method = {"kind": "hft", "granularity": "category", "ratio": 0.5, "seed": SEED,
              **({"reselect_every": reselect_every} if reselect_every else {})}
    stage = StageJob(STAGE, "hft stage 2/2 (upper)", examples, STEPS, 1e-3, 7, str(tmp_path / "out"), method)
    job = BranchJob("hft", "", (stage,), batch_size=8, max_length=64, log_every=STEPS)
    snapshots = {0: weights(model)}
    run_steps = stage_module.run_steps

    def run_steps_seen(model, *args, on_step, **kwargs):
        def seen(step, loss):
            if step % EVERY == 0:
                snapshots[step] = weights(model)  # before the method's after_step draws the next plan
            on_step(step, loss)
        return run_steps(model, *args, on_step=seen, **kwargs)

    monkeypatch.setattr(stage_module, "run_steps", run_steps_seen)
    trained, selection, _ = stage_module.fit_stage(model, char_tokenizer(), job, stage,
                                                   Runtime(0, 1, torch.device("cpu")),
                                                   LocalChannel(tmp_path, on_event=lambda event: None))

    units = model_units(trained)
    periods = range(STEPS // EVERY) if reselect_every else [0] * (STEPS // EVERY)
    plans = [plan_units(units, "llama", "category", 0.5, SEED, STAGE, period=p) for p in periods]
    expected = [{name for name, mask in plan.param_masks().items() if mask is True} for plan in plans]
    moved = [{name for name in snapshots[0] if not torch.equal(snapshots[end][name], snapshots[end - EVERY][name])}
             for end in range(EVERY, STEPS + 1, EVERY)]
    assert moved == expected
    if reselect_every:
        assert len({frozenset(names) for names in moved}) == 3, "each period trains a different half"
        assert selection.get("reselect_every") == EVERY and selection["trained"] == sorted(plans[0].trained)
    assert all(0 < len(names) < len(snapshots[0]) for names in moved)
