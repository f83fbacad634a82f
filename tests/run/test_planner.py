"""The planner: what each stage of a branch trains on, down to the batches its stage trains on."""

from collections import Counter
from dataclasses import replace

import torch

import hft_ray.train.stage as stage_module
from hft_ray.config.preflight import prepare
from hft_ray.config.spec import parse_spec
from hft_ray.data.batching import Part, Pool
from hft_ray.data.encoding import encode
from hft_ray.run.planner import Planner
from hft_ray.train.channel import LocalChannel
from hft_ray.train.models import char_tokenizer, load_model
from hft_ray.train.runtime import Runtime


def _planner(tmp_path):
    spec = parse_spec({
        "name": "p", "model": {"source": "builtin:tiny-llama"},
        "domains": {"upper": {"source": "builtin:upper", "train_size": 40},
                    "caesar": {"source": "builtin:caesar", "train_size": 60}},
        "stages": [{"domain": "upper", "steps": 7}, {"domain": "caesar", "steps": 9}],
        "methods": {"fft": {"kind": "fft"}, "mtl": {"kind": "joint"}, "replay": {"kind": "fft", "replay": 0.25}},
        "train": {"batch_size": 16, "max_length": 64}, "output": {"dir": str(tmp_path)}})
    prepared = prepare(spec)  # tokenizes every domain into tmp_path/tokens
    return Planner(spec, prepared.domains, tmp_path), prepared.domains


def test_joint_trains_every_stage_on_all_the_stages_data_by_their_own_sizes_for_the_stages_steps(tmp_path):
    planner, domains = _planner(tmp_path)
    joint = planner.branch("mtl", 1, "base").stages
    sequential = planner.branch("fft", 1, "base").stages
    assert [s.steps for s in joint] == [s.steps for s in sequential] == [7, 9]
    assert joint[0].parts == joint[1].parts == (Part(domains["upper"].tokens), Part(domains["caesar"].tokens))
    assert len(Pool(joint[0].parts)) == 100, "each domain once: 40 + 60 rows, none upsampled"
    assert sequential[1].parts == (Part(domains["caesar"].tokens),)
    assert all(str(tmp_path / "tokens") in p.folder for p in joint[0].parts), "token folders under output.dir"
    assert joint[0].method["kind"] == "joint" and joint[1].output.endswith("mtl/stage-2")


def rows(tensors: dict) -> list[tuple[int, ...]]:
    """Each encoded row's tokens, without its padding."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(tensors["input_ids"], tensors["attention_mask"],
                                                                   strict=True)]


def test_replay_puts_earlier_stages_rows_into_the_batches_a_later_stage_trains_on(tmp_path, monkeypatch):
    """replay: 0.25 on stage 2 (caesar, 60 rows) adds 20 of stage 1's upper rows: the batches
    fit_stage feeds the model over one epoch (5 x 16 rows) hold exactly those 20 upper rows and
    every caesar row; stage 1, with nothing earlier to replay, and a method without replay hold none."""
    planner, domains = _planner(tmp_path)
    tokenizer = char_tokenizer()
    upper, caesar = (set(rows(encode(list(domains[d].train), tokenizer, 64))) for d in ("upper", "caesar"))
    assert not upper & caesar
    seen, run_steps = [], stage_module.run_steps

    def run_steps_seen(model, optimizer, scheduler, data, *args, **kwargs):
        def recorded():
            for micro_batches in data:
                for batch in micro_batches:
                    seen.extend(rows(batch))
                yield micro_batches
        return run_steps(model, optimizer, scheduler, recorded(), *args, **kwargs)

    monkeypatch.setattr(stage_module, "run_steps", run_steps_seen)

    def trained_rows(method: str, index: int, steps: int) -> tuple[Counter, list]:
        """(how many rows of each domain, the rows) in the batches of `steps` steps of the stage."""
        job = planner.branch(method, 1, "base")
        stage = replace(job.stages[index - 1], steps=steps)
        seen.clear()
        stage_module.fit_stage(load_model("builtin:tiny-llama", seed=0), tokenizer, job, stage,
                               Runtime(0, 1, torch.device("cpu")), LocalChannel(tmp_path, on_event=lambda event: None))
        return Counter("upper" if row in upper else "caesar" if row in caesar else "other" for row in seen), seen

    counts, replayed = trained_rows("replay", 2, 5)
    assert counts == {"caesar": 60, "upper": 20}
    assert set(replayed) >= caesar, "one epoch: every caesar row once"
    assert len({row for row in replayed if row in upper}) == 20, "20 of upper's 40 rows, none repeated"
    assert trained_rows("fft", 2, 4)[0] == {"caesar": 64}
    assert trained_rows("replay", 1, 2)[0] == {"upper": 32}
