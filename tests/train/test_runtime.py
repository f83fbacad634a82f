"""A stage's memory figures: each rank's peak host RSS since the stage started (the RSS high-water
mark is reset at its start), logged to the stage's MLflow run."""

import torch

from hft_ray.train.runtime import Runtime


def test_the_host_peak_follows_what_was_held_since_the_last_reset():
    runtime = Runtime(0, 1, torch.device("cpu"))
    runtime.reset_memory_peaks()
    before = runtime.memory_peaks()["memory/host_peak_gb/rank0"]
    block = torch.ones(64 * 2**20)  # 256 MiB, written
    held = runtime.memory_peaks()["memory/host_peak_gb/rank0"]
    del block
    runtime.reset_memory_peaks()
    after = runtime.memory_peaks()["memory/host_peak_gb/rank0"]
    assert held - before >= 0.24, (before, held)
    assert after < held - 0.2, "a reset starts the peak afresh (the next stage's is its own)"
