"""A stage's memory figures: each rank's peak host RSS since the stage started, logged to the stage's
MLflow run. The kernel's high-water mark is used where its reset takes; elsewhere (kernels and
sandboxes that keep the mark) a sampler thread stands in, and both must follow what was held since
the reset."""

import mmap
import time

import torch

from hft_ray.train import peaks
from hft_ray.train.peaks import HostPeak
from hft_ray.train.runtime import Runtime


def _held_then_released(peak: HostPeak) -> tuple[float, float, float]:
    peak.reset()
    before = peak.gb()
    # 256 MiB of fresh pages, written: an anonymous mapping, so the RSS grows by it even in a process
    # whose heap already holds that much freed memory (a tensor would reuse it, and the RSS not move).
    block = mmap.mmap(-1, 256 * 2**20)
    block.write(b"x" * len(block))
    time.sleep(0.1)
    block.close()
    held = peak.gb()  # the block is gone: only a peak remembers it
    peak.reset()
    return before, held, peak.gb()


def test_the_host_peak_follows_what_was_held_since_the_last_reset():
    before, held, after = _held_then_released(Runtime(0, 1, torch.device("cpu")).host_peak)
    assert held - before >= 0.24, (before, held)
    assert after < held - 0.2, "a reset starts the peak afresh (the next stage's is its own)"


def test_where_the_kernel_keeps_its_mark_the_sampler_measures_the_peak(monkeypatch):
    monkeypatch.setattr(peaks, "_status_bytes", lambda key: 2**40)  # a mark no reset lowers
    peak = HostPeak()
    before, held, after = _held_then_released(peak)
    assert not peak.exact and peak._sampler is not None
    assert held - before >= 0.24, (before, held)
    assert after < held - 0.2
