"""Role maps: which role (attention q/k/v/o, feed-forward gate/up/down, norm, ...) each
parameter of a supported architecture plays, keyed by the config's `model_type`.

Selection works on *units*: one role in one layer (say layer 3's attention q), made of one
or more *parts*. A part is a whole tensor or, for fused modules such as GPT-2's `c_attn`,
a slice of one; a bias belongs to the same unit as its weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hft_ray.errors import UserError

ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")
FFN = ("ffn.gate", "ffn.up", "ffn.down")
NORMS = ("norm.attn", "norm.ffn")
TOP_LEVEL = ("embedding", "lm_head", "final_norm")
ROLES = ATTENTION + FFN + NORMS + TOP_LEVEL


def role_group(role: str) -> str:
    """The group a role is drawn within: `attn`, `ffn`, `norm`, or the role itself."""
    return role.split(".")[0]


@dataclass(frozen=True)
class Geometry:
    """The head layout that fused attention slices depend on."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> Geometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(heads, kv_heads, head_dim)


# A slice of one tensor: index ranges [start, stop) along one dimension.
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Part:
    """A whole parameter (dim is None) or the given ranges of it along `dim`."""

    param: str
    shape: tuple[int, ...]
    dim: int | None = None
    ranges: Ranges = ()

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        if self.dim is None:
            return total
        covered = sum(stop - start for start, stop in self.ranges)
        return total // self.shape[self.dim] * covered


@dataclass(frozen=True)
class Unit:
    """One role in one layer (layer None for embeddings, lm_head, final norm)."""

    role: str
    layer: int | None
    parts: tuple[Part, ...]

    @property
    def key(self) -> str:
        return self.role if self.layer is None else f"layers.{self.layer}.{self.role}"

    @property
    def numel(self) -> int:
        return sum(part.numel for part in self.parts)


# A fused layout maps (geometry, number of output features) to each role's output ranges.
FusedLayout = Callable[[Geometry, int], dict[str, Ranges]]


def _thirds(geometry: Geometry, out: int) -> dict[str, Ranges]:
    # GPT-2 c_attn: [q | k | v], each `out / 3` wide.
    third = out // 3
    return {"attn.q": ((0, third),), "attn.k": ((third, 2 * third),), "attn.v": ((2 * third, out),)}


def _per_head_interleaved(geometry: Geometry, out: int) -> dict[str, Ranges]:
    # GPT-NeoX query_key_value: viewed as (heads, 3 * head_size) then chunked, so head h
    # owns rows [3h*hs, 3(h+1)*hs) as [q_h | k_h | v_h].
    hs = out // (3 * geometry.num_heads)
    layout: dict[str, list[tuple[int, int]]] = {"attn.q": [], "attn.k": [], "attn.v": []}
    for head in range(geometry.num_heads):
        base = 3 * head * hs
        for index, role in enumerate(("attn.q", "attn.k", "attn.v")):
            layout[role].append((base + index * hs, base + (index + 1) * hs))
    return {role: tuple(ranges) for role, ranges in layout.items()}


def _grouped_qkv(geometry: Geometry, out: int) -> dict[str, Ranges]:
    # Phi-3 qkv_proj: [q (heads * hd) | k (kv_heads * hd) | v (kv_heads * hd)].
    q = geometry.num_heads * geometry.head_dim
    kv = geometry.num_kv_heads * geometry.head_dim
    return {"attn.q": ((0, q),), "attn.k": ((q, q + kv),), "attn.v": ((q + kv, out),)}


def _gate_up_halves(geometry: Geometry, out: int) -> dict[str, Ranges]:
    # Phi-3 gate_up_proj: output chunked in two, gate first.
    half = out // 2
    return {"ffn.gate": ((0, half),), "ffn.up": ((half, out),)}


@dataclass(frozen=True)
class Rule:
    """Parameters whose name matches `pattern` (with a `layer` group inside layers) play `role`,
    or, when `fused` is set, the roles of that layout, sliced along the output features
    (dim `weight_out_dim` of the weight, dim 0 of the bias)."""

    pattern: str
    role: str | None = None
    fused: FusedLayout | None = None
    weight_out_dim: int = 0


def _llama_rules(prefix: str = "model") -> tuple[Rule, ...]:
    layer = rf"{prefix}\.layers\.(?P<layer>\d+)\."
    return (
        Rule(rf"{prefix}\.embed_tokens\.weight", "embedding"),
        Rule(rf"{layer}self_attn\.q_proj\.(weight|bias)", "attn.q"),
        Rule(rf"{layer}self_attn\.k_proj\.(weight|bias)", "attn.k"),
        Rule(rf"{layer}self_attn\.v_proj\.(weight|bias)", "attn.v"),
        Rule(rf"{layer}self_attn\.o_proj\.(weight|bias)", "attn.o"),
        Rule(rf"{layer}mlp\.gate_proj\.(weight|bias)", "ffn.gate"),
        Rule(rf"{layer}mlp\.up_proj\.(weight|bias)", "ffn.up"),
        Rule(rf"{layer}mlp\.down_proj\.(weight|bias)", "ffn.down"),
        Rule(rf"{layer}input_layernorm\.(weight|bias)", "norm.attn"),
        Rule(rf"{layer}post_attention_layernorm\.(weight|bias)", "norm.ffn"),
        Rule(rf"{prefix}\.norm\.(weight|bias)", "final_norm"),
        Rule(r"lm_head\.weight", "lm_head"),
    )


_PHI3 = (
    Rule(r"model\.embed_tokens\.weight", "embedding"),
    Rule(r"model\.layers\.(?P<layer>\d+)\.self_attn\.qkv_proj\.(weight|bias)", fused=_grouped_qkv),
    Rule(r"model\.layers\.(?P<layer>\d+)\.self_attn\.o_proj\.(weight|bias)", "attn.o"),
    Rule(r"model\.layers\.(?P<layer>\d+)\.mlp\.gate_up_proj\.(weight|bias)", fused=_gate_up_halves),
    Rule(r"model\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.(weight|bias)", "ffn.down"),
    Rule(r"model\.layers\.(?P<layer>\d+)\.input_layernorm\.(weight|bias)", "norm.attn"),
    Rule(r"model\.layers\.(?P<layer>\d+)\.post_attention_layernorm\.(weight|bias)", "norm.ffn"),
    Rule(r"model\.norm\.(weight|bias)", "final_norm"),
    Rule(r"lm_head\.weight", "lm_head"),
)

# GPT-2 uses Conv1D: weights are (in, out), so fused slices run along dim 1.
_GPT2 = (
    Rule(r"transformer\.(wte|wpe)\.weight", "embedding"),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.attn\.c_attn\.(weight|bias)", fused=_thirds, weight_out_dim=1),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.attn\.c_proj\.(weight|bias)", "attn.o"),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.mlp\.c_fc\.(weight|bias)", "ffn.up"),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.mlp\.c_proj\.(weight|bias)", "ffn.down"),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.ln_1\.(weight|bias)", "norm.attn"),
    Rule(r"transformer\.h\.(?P<layer>\d+)\.ln_2\.(weight|bias)", "norm.ffn"),
    Rule(r"transformer\.ln_f\.(weight|bias)", "final_norm"),
    Rule(r"lm_head\.weight", "lm_head"),
)

_NEOX_LAYER = r"gpt_neox\.layers\.(?P<layer>\d+)\."
_GPT_NEOX = (
    Rule(r"gpt_neox\.embed_in\.weight", "embedding"),
    Rule(_NEOX_LAYER + r"attention\.query_key_value\.(weight|bias)", fused=_per_head_interleaved),
    Rule(_NEOX_LAYER + r"attention\.dense\.(weight|bias)", "attn.o"),
    Rule(_NEOX_LAYER + r"mlp\.dense_h_to_4h\.(weight|bias)", "ffn.up"),
    Rule(_NEOX_LAYER + r"mlp\.dense_4h_to_h\.(weight|bias)", "ffn.down"),
    Rule(_NEOX_LAYER + r"input_layernorm\.(weight|bias)", "norm.attn"),
    Rule(_NEOX_LAYER + r"post_attention_layernorm\.(weight|bias)", "norm.ffn"),
    Rule(r"gpt_neox\.final_layer_norm\.(weight|bias)", "final_norm"),
    Rule(r"(lm_head|embed_out)\.weight", "lm_head"),
)

ROLE_MAPS: Mapping[str, tuple[Rule, ...]] = {
    "llama": _llama_rules(),
    "mistral": _llama_rules(),
    "qwen2": _llama_rules(),
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ROLE_MAPS))


def assign_roles(
    shapes: Mapping[str, tuple[int, ...]], model_type: str, geometry: Geometry
) -> list[Unit]:
    """Group every parameter (name -> shape) into units. Each parameter, or each slice of a
    fused one, gets exactly one role; a name no rule knows is an error, not a silent 'other'."""
    if model_type not in ROLE_MAPS:
        raise UserError(
            f"model: architecture {model_type!r} has no role map; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rules = [(re.compile(rule.pattern), rule) for rule in ROLE_MAPS[model_type]]
    parts: dict[tuple[int | None, str], list[Part]] = {}
    unknown = []
    for name, shape in shapes.items():
        matches = [(m, rule) for pattern, rule in rules if (m := pattern.fullmatch(name))]
        if len(matches) != 1:
            unknown.append(name)
            continue
        match, rule = matches[0]
        layer = int(match["layer"]) if "layer" in match.groupdict() else None
        shape = tuple(shape)
        if rule.fused is None:
            parts.setdefault((layer, rule.role), []).append(Part(name, shape))
            continue
        dim = rule.weight_out_dim if name.endswith("weight") else 0
        for role, ranges in rule.fused(geometry, shape[dim]).items():
            parts.setdefault((layer, role), []).append(Part(name, shape, dim, ranges))
    if unknown:
        raise UserError(
            f"model: the {model_type} role map does not know {len(unknown)} parameter(s): "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
            "the model differs from the architecture its model_type names"
        )
    order = {role: index for index, role in enumerate(ROLES)}
    keys = sorted(parts, key=lambda k: (-1 if k[0] is None else k[0], order[k[1]]))
    return [Unit(role, layer, tuple(parts[(layer, role)])) for layer, role in keys]
