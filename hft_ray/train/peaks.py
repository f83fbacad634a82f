"""A process's peak host memory (RSS) since a reset, for a stage's `memory/host_peak_gb` figures.

Linux keeps the exact high-water mark (`VmHWM`) and resets it when "5" is written to
/proc/self/clear_refs. A kernel or sandbox may refuse the write, or accept it and keep
the old mark, so the reset is checked: where it did not take, a thread samples the RSS every
`interval` seconds instead (a peak that lasts less than that can be missed). Elsewhere (macOS) the
figure is the process's peak since it started.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SLACK = 16 * 2**20      # a reset that took leaves the mark within this of the RSS


class HostPeak:
    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.exact = False            # the kernel's high-water mark was reset
        self._sampled = 0             # bytes, the largest RSS the sampler saw since the reset
        self._sampler: threading.Thread | None = None
        self._lock = threading.Lock()

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        hwm, rss = _status_bytes("VmHWM"), _rss_bytes()
        self.exact = hwm is not None and rss is not None and hwm <= rss + _SLACK
        with self._lock:
            self._sampled = rss or 0
        if not self.exact and rss is not None and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, name="host-peak", daemon=True)
            self._sampler.start()

    def gb(self) -> float:
        """The peak since the last `reset` (GB)."""
        rss = _rss_bytes()
        if rss is None:  # not Linux: the process's peak (kilobytes on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / (2**30 if sys.platform == "darwin" else 2**20)
        with self._lock:
            peak = max(self._sampled, rss)
        if self.exact:
            peak = max(peak, _status_bytes("VmHWM") or 0)
        return peak / 2**30

    def _sample(self) -> None:
        event = threading.Event()
        while not event.wait(self.interval):
            rss = _rss_bytes() or 0
            with self._lock:
                self._sampled = max(self._sampled, rss)


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _status_bytes(key: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith(key + ":")), None)
    return int(line.split()[1]) * 1024 if line else None
