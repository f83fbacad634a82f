"""The planner: what each stage of a branch trains on."""

from collections import Counter

from hft_ray.config.preflight import prepare
from hft_ray.config.spec import parse_spec
from hft_ray.run.planner import Planner


def _planner(tmp_path):
    spec = parse_spec({
        "name": "p", "model": {"source": "builtin:tiny-llama"},
        "domains": {"upper": {"source": "builtin:upper", "train_size": 40},
                    "caesar": {"source": "builtin:caesar", "train_size": 60}},
        "stages": [{"domain": "upper", "steps": 7}, {"domain": "caesar", "steps": 9}],
        "methods": {"fft": {"kind": "fft"}, "mtl": {"kind": "joint"}}})
    prepared = prepare(spec)
    return Planner(spec, prepared.domains, tmp_path), prepared.domains


def test_joint_trains_every_stage_on_all_the_stages_data_mixed_evenly_for_the_stages_steps(tmp_path):
    planner, domains = _planner(tmp_path)
    joint = planner.branch("mtl", 1, "base").stages
    sequential = planner.branch("fft", 1, "base").stages
    assert [s.steps for s in joint] == [s.steps for s in sequential] == [7, 9]
    assert joint[0].examples == joint[1].examples
    counts = Counter(joint[0].examples)
    assert set(counts) == set(domains["upper"].train) | set(domains["caesar"].train)
    assert len(joint[0].examples) == 120  # each domain up to the largest one's 60 rows
    assert sequential[1].examples == domains["caesar"].train
    assert joint[0].method["kind"] == "joint" and joint[1].output.endswith("mtl/stage-2")
