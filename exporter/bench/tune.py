"""Choose a graph variant by timing the candidates on the machine that builds (as TensorRT times its tactics).

Which graph is fastest depends on the CPU: MLAS picks kernels by ISA, and on an AVX-512 EPYC the batch-1 branch
tuned on another EPYC was the slowest variant (issue 14). So the optimize stage builds the candidates and this
module times them, each in a worker process of its own, calls interleaved, for a short budget per shape class:
decode at batch 1 and at batch 4 (context 512), and a short prefill. The score of a variant is the geometric mean
over the classes of its median time relative to the default variant's; the lowest wins, and a variant must beat
the default by more than MARGIN to replace it (a tie keeps the reproducible default).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from exporter.bench.timing import time_interleaved
from exporter.bench.worker import close_workers, open_workers
from exporter.machine import machine_info

# (name, batch, new tokens, past): the shape classes a deployment runs
SHAPES = (("decode batch 1", 1, 1, 511), ("decode batch 4", 4, 1, 511), ("prefill 32", 1, 32, 0))
MARGIN = 0.02
THREADS = 1  # steadier on shared cores (docs/results/speed.md); recorded with the choice


def choose_variant(candidates: dict[str, Path], default: str, budget_s: float = 1.0, threads: int = THREADS,
                   max_context: int | None = None) -> dict:
    """Time every candidate graph per shape class for about `budget_s` seconds each; the choice and the timings."""
    workers = open_workers(candidates, threads=threads, together=True)
    timings = {}
    try:
        for shape, batch, seq, past in SHAPES:
            past = min(past, max_context - seq) if max_context else past
            for worker in workers.values():
                worker.prepare(batch, seq, past)
            times = time_interleaved({n: w.run for n, w in workers.items()}, warmup=1, rounds=50, budget_s=budget_s)
            timings[shape] = {n: round(statistics.median(t) * 1e3, 3) for n, t in times.items()}
    finally:
        close_workers(workers)
    scores = {n: math.exp(statistics.mean(math.log(timings[s][n] / timings[s][default]) for s in timings))
              for n in candidates}
    best = min(scores, key=scores.get)
    chosen = best if scores[best] < 1 - MARGIN else default
    return {"chosen": chosen, "default": default, "scores": {n: round(v, 4) for n, v in scores.items()},
            "median_ms": timings, "budget_s_per_shape": budget_s, "margin": MARGIN,
            "machine": machine_info(threads)}
