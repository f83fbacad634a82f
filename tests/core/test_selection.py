"""The selection rule: the paper's category-level counts, its generalisations, determinism."""

import json
import math
from collections import Counter

import pytest
import torch

from hft_ray.core.roles import role_group
from hft_ray.core.selection import GRANULARITIES, SelectionPlan, model_units, round_half_up, select
from hft_ray.errors import UserError
from hft_ray.train.models import load_model, meta_model


@pytest.fixture(scope="module")
def llama():
    return meta_model("builtin:tiny-llama")


def _trained_by_layer_group(plan):
    counts = Counter()
    for unit in plan.units:
        if unit.layer is not None and unit.key in plan.trained:
            counts[(unit.layer, role_group(unit.role))] += 1
    return counts


def test_category_rule_is_the_papers(tiny_model):
    """Per layer: 2 of 4 attention matrices, 1 of 2 norms; feed-forward: 2 of 3 in half the
    layers and 1 in the other half (1 of 2 for GPT-2/NeoX); embeddings, lm_head, final norm trained."""
    plan = select(tiny_model, "category", 0.5, seed=3)
    counts = _trained_by_layer_group(plan)
    layers = tiny_model.config.num_hidden_layers
    assert all(counts[(layer, "attn")] == 2 and counts[(layer, "norm")] == 1 for layer in range(layers))
    ffn = sorted(counts[(layer, "ffn")] for layer in range(layers))
    gated = any(u.role == "ffn.gate" for u in plan.units)
    assert ffn == ([1] * (layers // 2) + [2] * (layers // 2) if gated else [1] * layers)
    assert all(u.key in plan.trained for u in plan.units if u.layer is None)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.75])
def test_other_ratios_round_each_group_total_and_spread_it_over_layers(llama, ratio):
    plan = select(llama, "category", ratio, seed=1)
    counts = _trained_by_layer_group(plan)
    layers = llama.config.num_hidden_layers
    for group, size in {"attn": 4, "ffn": 3, "norm": 2}.items():
        per_layer = [counts[(layer, group)] for layer in range(layers)]
        assert sum(per_layer) == round_half_up(ratio * size * layers)
        assert all(math.floor(ratio * size) <= n <= math.floor(ratio * size) + 1 for n in per_layer)


def test_layer_granularity_trains_whole_layers(llama):
    plan = select(llama, "layer", 0.5, seed=0)
    layer_states = {}
    for unit in plan.units:
        if unit.layer is not None:
            layer_states.setdefault(unit.layer, set()).add(unit.key in plan.trained)
    assert all(len(states) == 1 for states in layer_states.values())
    assert sum(states == {True} for states in layer_states.values()) == 2


def test_model_granularity_draws_from_the_whole_model(llama):
    plan = select(llama, "model", 0.5, seed=0)
    in_layers = [u for u in plan.units if u.layer is not None]
    assert sum(u.key in plan.trained for u in in_layers) == round_half_up(0.5 * len(in_layers))
    # Not the same count in every layer for every seed: the draw ignores layer boundaries.
    per_layer = {s: _trained_by_layer_group(select(llama, "model", 0.5, seed=s)) for s in range(5)}
    assert len({tuple(sorted(c.items())) for c in per_layer.values()}) > 1


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_element_masks_train_exactly_round_p_n_entries_of_every_tensor(llama, ratio):
    plan = select(llama, "element", ratio, seed=0)
    masks = plan.param_masks()
    for unit in plan.units:
        for part in unit.parts:
            mask = masks[part.param]
            if unit.layer is None:
                assert mask is True
            else:
                assert int(mask.sum()) == round_half_up(ratio * mask.numel())


def test_select_embeddings_puts_top_level_under_selection(llama):
    plan = select(llama, "category", 0.5, seed=0, select_embeddings=True)
    top = [u for u in plan.units if u.layer is None]
    assert len(top) == 3 and sum(u.key in plan.trained for u in top) == round_half_up(1.5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_same_inputs_same_plan_and_every_stage_draws_a_new_one(llama, granularity):
    first = select(llama, granularity, 0.5, seed=7, stage=2)
    again = select(meta_model("builtin:tiny-llama"), granularity, 0.5, seed=7, stage=2)
    other_stage = select(llama, granularity, 0.5, seed=7, stage=3)
    masks, masks_again, masks_other = first.param_masks(), again.param_masks(), other_stage.param_masks()
    assert all(_same(masks[n], masks_again[n]) for n in masks)
    assert not all(_same(masks[n], masks_other[n]) for n in masks)


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return torch.equal(a, b)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_plan_survives_a_json_round_trip(granularity):
    model = meta_model("builtin:tiny-phi3")  # fused slices in the plan
    plan = select(model, granularity, 0.5, seed=2, stage=1)
    loaded = SelectionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert loaded == plan
    masks, loaded_masks = plan.param_masks(), loaded.param_masks()
    assert all(_same(masks[n], loaded_masks[n]) for n in masks)


def test_fractions_by_parameters_follow_the_real_sizes_under_grouped_query_attention(llama):
    """k and v are half the size of q and o here (2 KV heads of 4): the parameter-count
    fraction of attention is not the matrix-count fraction unless the draw is balanced."""
    plan = select(llama, "category", 0.5, seed=0)
    attn = [u for u in plan.units if role_group(u.role) == "attn"]
    q = plan.fractions()["by_params"]
    for role in ("attn.q", "attn.k", "attn.v", "attn.o"):
        units = [u for u in attn if u.role == role]
        assert q[role] == sum(u.numel for u in units if u.key in plan.trained) / sum(u.numel for u in units)
    assert plan.fractions()["by_matrices"]["selectable"] == 0.5
    model = load_model("builtin:tiny-llama")
    total = sum(p.numel() for p in model.parameters())
    trained_total = sum(u.numel for u in plan.units if u.key in plan.trained)
    assert q["overall"] == pytest.approx(trained_total / total)


def test_bad_selection_arguments_are_all_named(llama):
    with pytest.raises(UserError) as caught:
        select(llama, "rows", 1.5)
    assert len(caught.value.problems) == 2
    assert "granularity: 'rows'" in str(caught.value) and "category, layer, model, element" in str(caught.value)
    assert "ratio: 1.5 is outside (0, 1)" in str(caught.value)


def test_units_of_a_tied_model_do_not_count_the_tied_head_twice():
    model = meta_model("builtin:tiny-gpt2")  # lm_head is tied to wte
    roles = {u.role for u in model_units(model)}
    assert "lm_head" not in roles and "embedding" in roles
