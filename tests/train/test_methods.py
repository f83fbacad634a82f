"""A method is one file (hft_ray/train/methods) and one schema entry (hft_ray/config/spec.py): the
driver asks the method's class what it trains, what it refuses under fsdp and what the workers get,
and no other module switches on `kind`."""

import re
import typing
from pathlib import Path

from hft_ray.config.spec import Method, parse_spec
from hft_ray.core.memory import trained_params
from hft_ray.train.methods import METHODS, method_class
from hft_ray.train.models import meta_model

PACKAGE = Path(__file__).parents[2] / "hft_ray"


def test_every_kind_the_schema_accepts_has_its_class():
    entries = typing.get_args(typing.get_args(Method)[0])
    assert {typing.get_args(e.model_fields["kind"].annotation)[0] for e in entries} == set(METHODS)


def test_each_class_answers_the_drivers_questions_on_a_model_with_fused_projections():
    spec = parse_spec({"name": "t", "model": {"source": "builtin:tiny-gpt2"},
                       "domains": {"copy": {"source": "builtin:copy"}}, "stages": [{"domain": "copy", "steps": 1}],
                       "methods": {"fft": {"kind": "fft"}, "hft": {"kind": "hft", "granularity": "category"},
                                   "lora": {"kind": "lora"}, "joint": {"kind": "joint"}}}, "test")
    model = meta_model("builtin:tiny-gpt2")
    everything = trained_params(model, None)
    counts = {n: method_class(m.kind).trained_params(model, m) for n, m in spec.methods.items()}
    assert counts["fft"] == counts["joint"] == everything
    assert 0 < counts["lora"] < counts["hft"] < everything
    refused = {n: method_class(m.kind).fsdp_problems(model, m, f"methods.{n}") for n, m in spec.methods.items()}
    assert not refused["fft"] and not refused["joint"]
    assert refused["lora"][0].startswith("methods.lora: kind lora cannot run with train.strategy: fsdp")
    assert "c_attn" in refused["hft"][0], "GPT-2's fused c_attn is trained in slices, through masks"
    assert method_class("hft").worker_config(spec.methods["hft"], 7)["seed"] == 7, "the pipeline's seed"
    assert "replay" not in method_class("fft").worker_config(spec.methods["fft"], 7)
    assert [k for k, c in METHODS.items() if c.every_stage_data] == [k for k, c in METHODS.items() if c.reference] \
        == ["joint"]


def test_no_module_outside_the_methods_switches_on_a_methods_kind():
    switch = re.compile(r"""\.kind\s*(==|!=|in)\s*\(?["'](fft|hft|lora|joint)["']""")
    found = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
             if "methods" not in path.parts for line in path.read_text().splitlines() if switch.search(line)]
    assert not found, found
