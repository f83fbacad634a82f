"""Role maps against the real transformers models: every entry of every parameter gets exactly
one role, and the roles are what the model computes with them."""

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from hft_ray.core.roles import ATTENTION, Geometry, assign_roles
from hft_ray.core.selection import model_units
from hft_ray.errors import UserError


def test_every_entry_of_every_parameter_has_exactly_one_role(tiny_model):
    cover = {name: torch.zeros_like(p, dtype=torch.int32) for name, p in tiny_model.named_parameters()}
    for unit in model_units(tiny_model):
        for part in unit.parts:
            if part.dim is None:
                cover[part.param] += 1
            for start, stop in part.ranges:
                cover[part.param].narrow(part.dim, start, stop - start).add_(1)
    for name, counts in cover.items():
        assert torch.all(counts == 1), f"{name}: entries covered {counts.unique().tolist()} times"


def test_each_layer_has_its_attention_feedforward_and_norm_roles(tiny_model):
    units = model_units(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    gated = tiny_model.config.model_type not in ("gpt2", "gpt_neox")
    for layer in range(layers):
        roles = {u.role for u in units if u.layer == layer}
        expected = set(ATTENTION) | {"ffn.up", "ffn.down", "norm.attn", "norm.ffn"} | ({"ffn.gate"} if gated else set())
        assert roles == expected
    assert {u.role for u in units if u.layer is None} >= {"embedding", "final_norm"}


def _module(model, param_name):
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _project(x, module, part, bias_part):
    """The output features `part` selects, computed by hand from the module's weight."""
    weight = module.weight
    sliced = torch.cat([torch.arange(a, b) for a, b in part.ranges]) if part.dim is not None else None
    if isinstance(module, Conv1D):  # (in, out)
        cols = sliced if sliced is not None else torch.arange(weight.shape[1])
        out = x @ weight[:, cols]
    else:
        rows = sliced if sliced is not None else torch.arange(weight.shape[0])
        out = x @ weight[rows].T
    if bias_part is not None:
        out = out + module.bias[cols if isinstance(module, Conv1D) else rows]
    return out


def _capture_inputs(model, modules):
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, key=key: seen.setdefault(key, args[0].detach()))
               for key, m in modules.items()]
    return seen, handles


def _unit(units, layer, role):
    (unit,) = [u for u in units if u.layer == layer and u.role == role]
    weight = next(p for p in unit.parts if p.param.endswith("weight"))
    bias = next((p for p in unit.parts if p.param.endswith("bias")), None)
    return weight, bias


@torch.no_grad()
def test_value_slice_is_what_attention_averages_when_queries_are_zeroed(tiny_model):
    """Zero the layer-0 query slice: attention becomes a causal mean of the values, and the
    values must be exactly what the 'attn.v' slice computes (GQA and fused layouts included)."""
    model, config = tiny_model, tiny_model.config
    units = model_units(model)
    q_weight, q_bias = _unit(units, 0, "attn.q")
    v_weight, v_bias = _unit(units, 0, "attn.v")
    o_weight, _ = _unit(units, 0, "attn.o")
    for part in (q_weight, q_bias):
        if part is None:
            continue
        param = model.get_parameter(part.param)
        if part.dim is None:
            param.zero_()
        for a, b in part.ranges:
            param.narrow(part.dim, a, b - a).zero_()
    v_module, o_module = _module(model, v_weight.param), _module(model, o_weight.param)
    seen, handles = _capture_inputs(model, {"v": v_module, "o": o_module})
    ids = torch.randint(4, config.vocab_size, (2, 7))
    model(ids)
    for h in handles:
        h.remove()
    geometry = Geometry.from_config(config)
    values = _project(seen["v"], v_module, v_weight, v_bias)  # (batch, seq, kv_heads * hd)
    values = values.view(2, 7, geometry.num_kv_heads, geometry.head_dim)
    causal_mean = values.cumsum(1) / torch.arange(1, 8).view(1, 7, 1, 1)
    group = geometry.num_heads // geometry.num_kv_heads
    expected = causal_mean.repeat_interleave(group, dim=2).reshape(2, 7, -1)
    torch.testing.assert_close(seen["o"], expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_feedforward_slices_compute_what_the_mlp_computes(tiny_model):
    """The input of 'ffn.down' equals act(gate(x)) * up(x) (or act(up(x))) from our slices."""
    model, config = tiny_model, tiny_model.config
    units = model_units(model)
    up_weight, up_bias = _unit(units, 0, "ffn.up")
    down_weight, _ = _unit(units, 0, "ffn.down")
    up_module, down_module = _module(model, up_weight.param), _module(model, down_weight.param)
    seen, handles = _capture_inputs(model, {"up": up_module, "down": down_module})
    model(torch.randint(4, config.vocab_size, (2, 5)))
    for h in handles:
        h.remove()
    act = ACT2FN[getattr(config, "hidden_act", None) or config.activation_function]
    up = _project(seen["up"], up_module, up_weight, up_bias)
    if any(u.role == "ffn.gate" for u in units):
        gate_weight, gate_bias = _unit(units, 0, "ffn.gate")
        expected = act(_project(seen["up"], up_module if gate_weight.param == up_weight.param
                                else _module(model, gate_weight.param), gate_weight, gate_bias)) * up
    else:
        expected = act(up)
    torch.testing.assert_close(seen["down"], expected, rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UserError, match=r"'bloom' has no role map; supported model types: gpt2, gpt_neox, llama"):
        assign_roles({"w": (2, 2)}, "bloom", Geometry(2, 2, 2))


def test_a_parameter_the_map_does_not_know_is_an_error_not_a_silent_role():
    with pytest.raises(UserError, match="does not know 1 parameter"):
        assign_roles({"model.layers.0.self_attn.q_proj.weight": (4, 4), "model.extra.weight": (4,)},
                     "llama", Geometry(2, 2, 2))
