"""Wall time and peak resident memory of each pipeline stage."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class StageStats:
    name: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cached: bool = False  # restored from the stage cache instead of run
    detail: str = field(default="", repr=False)  # the stage line's summary (not in the report)

    def done(self, detail: str) -> None:
        self.detail = detail

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb, "cached": self.cached}


class PeakSampler(threading.Thread):
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
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = round(time.perf_counter() - start, 3)
        record.peak_rss_mb = round(sampler.stop() / 2**20, 1)
        stats.append(record)


class StageLog:
    """The run's stage lines: a spinner while a stage runs, then `✓ name  seconds  peak MiB  detail`.
    Silent without a console; `records` keeps every stage's StageStats for the report."""

    def __init__(self, console=None):
        self.console = console
        self.records: list[StageStats] = []

    def say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    @contextlib.contextmanager
    def stage(self, name: str, status: str | None = None):
        """Time stage `name` (a spinner shows `status` meanwhile); the block calls `record.done(detail)`."""
        with stage(name, self.records) as record:
            spinner = self.console.status(status) if self.console is not None and status else contextlib.nullcontext()
            with spinner:
                yield record
        self.say(f"[green]✓[/] {record.name + (' (cached)' if record.cached else ''):<18} {record.seconds:6.1f} s  "
                 f"{record.peak_rss_mb:7,.0f} MiB  {record.detail}")
