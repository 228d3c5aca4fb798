"""Wall time and peak resident memory of each pipeline stage."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class StageStats:
    name: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cached: bool = False  # restored from the stage cache instead of run


class _PeakSampler(threading.Thread):
    """Samples this process's RSS every `interval` seconds; `peak` is the largest seen."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextlib.contextmanager
def stage(name: str, stats: list[StageStats]):
    """Time a stage and record its peak RSS into `stats` (also when the stage raises)."""
    record = StageStats(name)
    sampler = _PeakSampler()
    sampler.start()
    start = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = round(time.perf_counter() - start, 3)
        record.peak_rss_mb = round(sampler.stop() / 2**20, 1)
        stats.append(record)
