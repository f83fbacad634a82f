"""Run one branch job without Ray, in this process or under torchrun:

    python -m hft_ray.train JOB.json [--folder DIR]
    torchrun --nproc_per_node 2 -m hft_ray.train JOB.json

JOB.json is a `BranchJob` as `BranchJob.to_json()` writes it (hft_ray.run.planner makes them
from a pipeline). Resumable checkpoints go to DIR/resume (default: beside JOB.json); run the
same command again after a failure and it goes on from there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch.distributed as dist

from hft_ray.train.branch import train_branch
from hft_ray.train.channel import LocalChannel
from hft_ray.train.events import StageTrained
from hft_ray.train.job import BranchJob


def report(event: object) -> None:
    if isinstance(event, StageTrained):
        print(f"[hft-ray] {event.branch} stage {event.stage}: checkpoint {event.checkpoint} "
              f"({len(event.losses)} steps, {event.step_s * 1000:.0f} ms/step)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hft_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("--folder", type=Path, help="where resumable checkpoints go (default: the job's folder)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train_branch(BranchJob.load(args.job), LocalChannel(args.folder or args.job.parent, on_event=report))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
