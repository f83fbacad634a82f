"""A branch job under torchrun for the tests: rank 0's events go to a JSON-lines file, and
`--crash-at STAGE STEP` stops the group there (every rank, as a dead node would)."""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch.distributed as dist

from hft_ray.train.branch import train_branch
from hft_ray.train.channel import LocalChannel
from hft_ray.train.events import StepsDone
from hft_ray.train.job import BranchJob

parser = argparse.ArgumentParser()
parser.add_argument("job", type=Path)
parser.add_argument("events", type=Path)
parser.add_argument("--crash-at", type=int, nargs=2)
args = parser.parse_args()


def record(event) -> None:
    with args.events.open("a") as out:
        out.write(json.dumps({"kind": type(event).__name__, **dataclasses.asdict(event)}) + "\n")
    if args.crash_at and isinstance(event, StepsDone) and [event.stage, event.step] == args.crash_at:
        os._exit(3)  # rank 0 dies; torchrun stops the other rank


train_branch(BranchJob.load(args.job), LocalChannel(args.job.parent, record))
if dist.is_initialized():
    dist.destroy_process_group()
