"""The branch train function without Ray: in this process, after a crash, and under torchrun
(DDP and FSDP2 over gloo)."""

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hft_ray.data.batching import part_of
from hft_ray.data.domains import BUILTIN_DOMAINS
from hft_ray.train.branch import train_branch
from hft_ray.train.channel import LocalChannel
from hft_ray.train.checkpoints import write_checkpoint
from hft_ray.train.events import StageStarted, StageTrained, StepsDone
from hft_ray.train.job import BranchJob, StageJob, TrainSettings
from hft_ray.train.models import load_model, load_tokenizer

HFT = {"kind": "hft", "granularity": "category", "ratio": 0.5, "seed": 0}


def examples(kind: str, n: int, seed: int):
    return tuple(BUILTIN_DOMAINS[kind].generate(random.Random(seed), n))


def make_job(folder: Path, method: dict = HFT, steps: int = 12, checkpoint_every: int = 0) -> BranchJob:
    base = folder / "base"
    if not base.exists():
        write_checkpoint(base, load_model("builtin:tiny-llama", seed=0), load_tokenizer("builtin:tiny-llama"))
    upper, caesar = examples("upper", 128, 0), examples("caesar", 128, 1)
    tokenizer, store = load_tokenizer("builtin:tiny-llama"), folder / "tokens"
    stages = (StageJob(1, "s1", (part_of(upper, tokenizer, store, max_length=32),), steps, 2e-3, 1,
                       str(folder / "hft" / "stage-1"), method),
              StageJob(2, "s2", (part_of(caesar, tokenizer, store, max_length=32),), steps, 2e-3, 2,
                       str(folder / "hft" / "stage-2"), method, earlier=(upper,)),
              StageJob(3, "s3", (), 4, 2e-3, 3, str(folder / "hft" / "stage-3"), method,
                       loss="dpo", beta=0.5, pairs=examples("prefer", 64, 2)))
    return BranchJob("hft", str(base), stages, TrainSettings(batch_size=16, max_length=32, log_every=4,
                                                             checkpoint_every=checkpoint_every))


class Crash(Exception):
    pass


def run(job: BranchJob, folder: Path, crash_at: tuple[int, int] | None = None) -> list:
    """train_branch with a LocalChannel; `crash_at` = (stage, step) raises at that progress event."""
    events = []

    def on_event(event):
        events.append(event)
        if crash_at and isinstance(event, StepsDone) and (event.stage, event.step) == crash_at:
            raise Crash()

    try:
        train_branch(job, LocalChannel(folder / "channel", on_event))
    except Crash:
        pass
    return events


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_a_branch_trains_its_stages_in_order_and_leaves_frozen_tensors_as_they_were(tmp_path):
    job = make_job(tmp_path)
    events = run(job, tmp_path)
    kinds = [(type(e).__name__, e.stage) for e in events if not isinstance(e, StepsDone)]
    assert kinds == [("StageStarted", 1), ("StageTrained", 1), ("StageStarted", 2), ("StageTrained", 2),
                     ("StageStarted", 3), ("StageTrained", 3)]
    started = [e for e in events if isinstance(e, StageStarted)]
    assert started[0].selection["trained"] != started[1].selection["trained"], "every stage draws a new plan"
    assert started[1].selection["strategy"] == "random"
    before, after = weights(tmp_path / "base"), weights(tmp_path / "hft" / "stage-1")
    frozen = {p["param"] for u in started[0].selection["units"] for p in u["parts"]
              if u["key"] not in started[0].selection["trained"]}
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert any(not torch.equal(before[name], after[name]) for name in before.keys() - frozen)
    trained = [e for e in events if isinstance(e, StageTrained)]
    assert [len(e.losses) for e in trained] == [12, 12, 4] and trained[0].losses[-1] < trained[0].losses[0]


def test_a_crashed_branch_goes_on_from_its_last_checkpoint_and_ends_as_if_nothing_happened(tmp_path):
    whole = run(make_job(tmp_path / "a", checkpoint_every=4), tmp_path / "a")
    job = make_job(tmp_path / "b", checkpoint_every=4)
    first = run(job, tmp_path / "b", crash_at=(2, 8))  # after stage 2's checkpoint at step 4, before step 8's
    assert not any(isinstance(e, StageTrained) and e.stage == 2 for e in first)
    second = run(job, tmp_path / "b")
    assert [type(e).__name__ for e in second][:2] == ["StageStarted", "StageResumed"]
    assert second[1].step == 4, "resumed after the step-4 checkpoint"

    def losses(events, stage):
        return next(e.losses for e in events if isinstance(e, StageTrained) and e.stage == stage)

    assert losses(second, 2) == losses(whole, 2), "same batches, same optimizer state: the same losses"
    assert losses(second, 3) == losses(whole, 3)


def test_stages_written_before_a_restart_are_not_trained_again(tmp_path):
    job = make_job(tmp_path)
    run(job, tmp_path)
    again = run(job, tmp_path / "other-channel")  # no resumable checkpoint: every stage is whole already
    assert [type(e).__name__ for e in again] == ["StageTrained"] * 3
    assert [e.checkpoint for e in again] == [s.output for s in job.stages]


def test_a_job_round_trips_through_json(tmp_path):
    job = make_job(tmp_path)
    assert BranchJob.from_json(job.to_json()) == job


def test_two_processes_under_torchrun_train_one_branch_with_ddp(tmp_path):
    job = make_job(tmp_path, steps=8)
    job = BranchJob(job.name, job.start, job.stages[:1], TrainSettings(batch_size=16, max_length=32, log_every=4))
    (tmp_path / "job.json").write_text(job.to_json())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "hft_ray.train", str(tmp_path / "job.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hft stage 1: checkpoint" in result.stdout and "(8 steps" in result.stdout
    before, after = weights(tmp_path / "base"), weights(job.stages[0].output)
    frozen, names = frozen_and_trained(json.loads((Path(job.stages[0].output) / "plan.json").read_text()))
    assert after.keys() == before.keys() == frozen | names and frozen and names
    assert all(torch.equal(before[n], after[n]) for n in frozen), "a frozen tensor moved"
    assert all(not torch.equal(before[n], after[n]) for n in names), "a trained tensor did not move"


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_a_branch_trains_in_bf16_with_gradient_checkpointing_and_keeps_its_dtype(tmp_path, precision, dtype):
    job = make_job(tmp_path, steps=8)
    job = BranchJob(job.name, job.start, job.stages[:2], TrainSettings(
        batch_size=16, max_length=32, log_every=4, precision=precision, gradient_checkpointing=True))
    events = run(job, tmp_path)
    trained = [e for e in events if isinstance(e, StageTrained)]
    assert len(trained) == 2 and trained[0].losses[-1] < trained[0].losses[0]
    saved = weights(job.stages[1].output)
    assert {t.dtype for t in saved.values()} == {dtype}
    started = next(e for e in events if isinstance(e, StageStarted) and e.stage == 2)
    before = weights(job.stages[0].output)
    frozen = {p["param"] for u in started.selection["units"] for p in u["parts"]
              if u["key"] not in started.selection["trained"]}
    assert all(torch.equal(before[name], saved[name]) for name in frozen), "frozen stays bitwise, in bf16 too"


def torchrun(tmp_path: Path, job: BranchJob, name: str, *extra: str) -> tuple[int, list[dict]]:
    """`job` under torchrun with 2 processes; rank 0's events."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "job.json").write_text(job.to_json())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(Path(__file__).parent / "torchrun_branch.py"), str(folder / "job.json"),
                             str(folder / "events.jsonl"), *extra], capture_output=True, text=True, timeout=300)
    sys.stderr.write(result.stderr[-3000:] if result.returncode else "")  # shown when a test fails
    (folder / "stderr.txt").write_text(result.stderr)
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    return result.returncode, events


def sharded_job(tmp_path: Path, name: str, method: dict = HFT, **settings) -> BranchJob:
    job = make_job(tmp_path, method, steps=8)
    stages = tuple(dataclasses.replace(s, output=str(tmp_path / name / f"stage-{s.index}")) for s in job.stages[:2])
    return dataclasses.replace(job, stages=stages, settings=dataclasses.replace(job.settings, batch_size=16,
                                                                                log_every=4, **settings))


def trained(events: list[dict], stage: int) -> dict:
    return next(e for e in events if e["kind"] == "StageTrained" and e["stage"] == stage)


def frozen_and_trained(selection: dict) -> tuple[set[str], set[str]]:
    """The parameter names a stage's HFT plan froze, and those it trained."""
    parts = [(u["key"] in selection["trained"], p["param"]) for u in selection["units"] for p in u["parts"]]
    return {n for t, n in parts if not t}, {n for t, n in parts if t}


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """One HFT branch (2 stages of 8 steps) under torchrun on 2 ranks, with ddp and with fsdp;
    every rank writes its optimizer state's bytes and (ddp) its weights after each stage's steps."""
    folder = tmp_path_factory.mktemp("strategies")
    runs = {}
    for strategy in ("ddp", "fsdp"):
        job = sharded_job(folder, strategy, strategy=strategy)
        code, runs[strategy] = torchrun(folder, job, strategy, "--ranks", str(folder / strategy / "ranks"))
        assert code == 0, strategy
    return folder, runs


def test_fsdp_trains_like_ddp_and_leaves_frozen_tensors_untouched(ddp_and_fsdp):
    folder, runs = ddp_and_fsdp
    for stage in (1, 2):
        assert trained(runs["fsdp"], stage)["losses"] == pytest.approx(trained(runs["ddp"], stage)["losses"], rel=1e-4)
    started = next(e for e in runs["fsdp"] if e["kind"] == "StageStarted" and e["stage"] == 2)
    before, after = weights(folder / "fsdp" / "stage-1"), weights(folder / "fsdp" / "stage-2")
    frozen, _ = frozen_and_trained(started["selection"])
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)


def rank_state(folder: Path, strategy: str, stage: int) -> list[dict]:
    return [json.loads((folder / strategy / "ranks" / f"rank-{r}-stage-{stage}.json").read_text()) for r in (0, 1)]


def test_fsdp_splits_the_optimizer_state_over_the_ranks_where_each_ddp_rank_holds_it_all(ddp_and_fsdp):
    folder, runs = ddp_and_fsdp
    shapes = {n: t.shape for n, t in weights(folder / "base").items()}
    for stage in (1, 2):
        started = {s: next(e for e in runs[s] if e["kind"] == "StageStarted" and e["stage"] == stage) for s in runs}
        assert started["ddp"]["selection"] == started["fsdp"]["selection"], "the same plan under both"
        _, names = frozen_and_trained(started["ddp"]["selection"])
        ddp, fsdp = rank_state(folder, "ddp", stage), rank_state(folder, "fsdp", stage)
        # AdamW's two fp32 moments for every trained entry, none for a frozen tensor, on each ddp rank.
        assert ddp[0]["entry_bytes"] == ddp[1]["entry_bytes"]
        assert ddp[0]["entry_bytes"].keys() == names and len(names) < len(shapes)
        assert sum(ddp[0]["entry_bytes"].values()) == 2 * 4 * started["ddp"]["trainable"]
        # fsdp: each rank holds its dim-0 shard of each of them: half, up to the half row an odd
        # dim 0 gives one rank more; the two shards together are the whole, nothing repeated.
        for name in names:
            whole, row = ddp[0]["entry_bytes"][name], ddp[0]["entry_bytes"][name] // shapes[name][0]
            assert all(abs(r["entry_bytes"][name] - whole / 2) <= row / 2 for r in fsdp), name
            assert fsdp[0]["entry_bytes"][name] + fsdp[1]["entry_bytes"][name] == whole, name
        totals = [sum(r["entry_bytes"].values()) + r["other_bytes"] for r in ddp + fsdp]
        assert all(0.49 <= t / totals[0] <= 0.51 for t in totals[2:]), totals
        assert 0.99 <= (totals[2] + totals[3]) / totals[0] <= 1.01, totals  # + each rank's step counters
        logged = json.loads((folder / "fsdp" / f"stage-{stage}" / "train_log.json").read_text())["optimizer_bytes"]
        assert logged == totals[2], "the train log's figure is rank 0's own shards"


def test_ddp_ranks_step_in_lockstep_and_move_only_their_trained_entries(ddp_and_fsdp):
    folder, runs = ddp_and_fsdp
    for stage, start in ((1, folder / "base"), (2, folder / "ddp" / "stage-1")):
        started = next(e for e in runs["ddp"] if e["kind"] == "StageStarted" and e["stage"] == stage)
        frozen, names = frozen_and_trained(started["selection"])
        before = weights(start)
        ranks = [load_file(str(folder / "ddp" / "ranks" / f"rank-{r}-stage-{stage}.safetensors")) for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() == before.keys() == frozen | names
        # gloo all-reduces to the same bits on every rank, and the optimizer step is the same there
        assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in before), "the ranks' replicas differ"
        assert all(torch.equal(before[n], ranks[0][n]) for n in frozen), "a frozen tensor moved"
        assert all(not torch.equal(before[n], ranks[0][n]) for n in names), "a trained tensor did not move"
        checkpoint = weights(folder / "ddp" / f"stage-{stage}")
        assert all(torch.equal(checkpoint[n], ranks[0][n]) for n in before), "the checkpoint is what was trained"


def test_a_sharded_bf16_branch_with_checkpointing_resumes_from_its_shards(tmp_path):
    settings = {"strategy": "fsdp", "precision": "bf16", "gradient_checkpointing": True, "checkpoint_every": 4}
    whole_code, whole = torchrun(tmp_path, sharded_job(tmp_path, "whole", **settings), "whole")
    job = sharded_job(tmp_path, "crashed", **settings)
    crash_code, _ = torchrun(tmp_path, job, "crashed", "--crash-at", "2", "8")  # after the step-4 shards
    assert whole_code == 0 and crash_code != 0
    assert (tmp_path / "crashed" / "resume" / "shards" / ".metadata").is_file(), "the step-4 shards"
    code, resumed = torchrun(tmp_path, job, "crashed")
    assert code == 0
    assert [e["step"] for e in resumed if e["kind"] == "StageResumed"] == [4]
    assert trained(resumed, 2)["losses"] == trained(whole, 2)["losses"]
    assert {t.dtype for t in weights(job.stages[1].output).values()} == {torch.bfloat16}


def test_fsdp_bf16_mixed_computes_in_bf16_over_float32_shards(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): each unit is gathered in bf16 for
    its forward and backward; the shards, AdamW's state and the checkpoint stay float32."""
    job = sharded_job(tmp_path, "mixed", strategy="fsdp", precision="bf16-mixed")
    code, events = torchrun(tmp_path, job, "mixed", "--ranks", str(tmp_path / "ranks"))
    assert code == 0
    ranks = [json.loads((tmp_path / "ranks" / f"rank-{r}-stage-1.json").read_text()) for r in (0, 1)]
    assert all(r["compute_dtypes"] == ["torch.bfloat16"] for r in ranks), ranks
    first = next(e for e in events if e["kind"] == "StageStarted" and e["stage"] == 1)
    trainable = sum(t.numel() for n, t in weights(job.start).items() if n in frozen_and_trained(first["selection"])[1])
    assert sum(sum(r["entry_bytes"].values()) for r in ranks) == 2 * 4 * trainable, "AdamW's two moments, fp32"
    losses = trained(events, 1)["losses"]
    assert losses[-1] < losses[0]
    started = next(e for e in events if e["kind"] == "StageStarted" and e["stage"] == 2)
    frozen, _ = frozen_and_trained(started["selection"])
    before, after = weights(job.stages[0].output), weights(job.stages[1].output)
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert all(torch.equal(before[n], after[n]) for n in frozen)
