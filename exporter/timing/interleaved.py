"""Timing that holds on a shared, noisy machine: calls interleaved (A B, then B A, ...) after a warm-up,
medians and percentiles, and ratios of medians taken in the same run. Removal efficiency = measured saving
/ predicted saving (cost.py), both as fractions of the full model's time."""

from __future__ import annotations

import os
import statistics
import time


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine's business while we measured), [] where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ONNX Runtime's intra-op threads spin for a while after a call. Two workers with 2 threads each on 2 vCPUs, calls
# interleaved: the idle worker's spinning ran on the cores the timed call needed, and SmolLM2's batch-1 decode step
# read 46 ms instead of 27 (scripts/peers/ab.py, 2026-12-04); a 10 ms pause after each call was not enough (40 ms),
# 50 ms was. One process decoding alone has no such neighbour, so multi-threaded timings pause.
SETTLE_S = 0.1


def settle_for(threads: int | None) -> float:
    """The untimed pause after each call for workers with `threads` intra-op threads (None: ORT's default, all
    cores): none for one thread (no pool to spin), SETTLE_S otherwise."""
    return 0.0 if threads == 1 else SETTLE_S


def time_interleaved(calls: dict, warmup: int, rounds: int, budget_s: float | None = None,
                     settle_s: float = 0.0) -> dict[str, list[float]]:
    """{name: callable} -> {name: [seconds per call]}, alternating the order every round (A B, B A, ...).

    A call that returns a float has timed itself (a GraphWorker, in its own process): that is the figure kept.
    `settle_s`: an untimed pause after each call, so that a worker's ONNX Runtime threads, which spin for a while
    after a call, are asleep before the next worker's call (with several intra-op threads per worker on a small
    machine, the idle worker's spinning otherwise runs on the cores the timed call needs).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            own = calls[name]()
            elapsed = time.perf_counter() - t0
            times[name].append(own if isinstance(own, float) else elapsed)
            if settle_s:
                time.sleep(settle_s)
        if budget_s is not None and r >= 4 and time.perf_counter() - start > budget_s:
            break
    return times


def summarize(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]  # noqa: E731
    return {"median_ms": round(statistics.median(seconds) * 1e3, 3), "p10_ms": round(q(0.1) * 1e3, 3),
            "p90_ms": round(q(0.9) * 1e3, 3), "n": len(seconds)}


def compare(times: dict, full: str, skipped: str, predicted_speedup: float | None) -> dict:
    """Measured ratio full / skipped, saving, and removal efficiency against the cost model."""
    f, s = statistics.median(times[full]), statistics.median(times[skipped])
    out = {"full": summarize(times[full]), "skipped": summarize(times[skipped]),
           "measured_speedup": round(f / s, 4), "measured_saving": round(1 - s / f, 4)}
    if predicted_speedup is not None:
        predicted_saving = 1 - 1 / predicted_speedup
        out["predicted_speedup"] = round(predicted_speedup, 4)
        out["predicted_saving"] = round(predicted_saving, 4)
        out["removal_efficiency"] = round(out["measured_saving"] / predicted_saving, 3) if predicted_saving > 0 else None
    return out
