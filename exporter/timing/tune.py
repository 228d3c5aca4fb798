"""Choose a graph variant by timing the candidates on the machine that builds (as TensorRT times its tactics).

Which graph is fastest depends on the CPU: MLAS picks kernels by ISA, and on an AVX-512 EPYC the batch-1 branch
tuned on another EPYC was the slowest variant (issue 14). So the optimize stage builds the candidates and this
module times them, each in a worker process of its own, calls interleaved, for a short budget per shape class:
decode at batch 1 (2 s) and at batch 4 (0.75 s; context 512), and a short prefill (0.75 s). The score of a variant is the geometric mean
over the classes of its median time relative to the default variant's; the lowest wins, and a variant must beat
the default by more than MARGIN to replace it (a tie keeps the reproducible default).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from exporter.timing.interleaved import time_interleaved
from exporter.timing.worker import close_workers, open_workers
from exporter.machine import machine_info

# (name, batch, new tokens, past, share of the budget): the shape classes a deployment runs. Batch-1 decode gets
# the most time: it is the common case, and the only one where the batch-1 branch and the packed graph differ
# (a 1 s budget there, under load 7 on 2 cores, once kept the branch where 8 focused sets had it 15% slower).
SHAPES = (("decode batch 1", 1, 1, 511, 2.0), ("decode batch 4", 4, 1, 511, 0.75), ("prefill 32", 1, 32, 0, 0.75))
MARGIN = 0.02
THREADS = 1  # steadier on shared cores (docs/results/speed.md); recorded with the choice


def choose_variant(candidates: dict[str, Path], default: str, budget_s: float = 1.0, threads: int = THREADS,
                   max_context: int | None = None) -> dict:
    """Time every candidate graph per shape class for about `budget_s` seconds each; the choice and the timings."""
    workers = open_workers(candidates, threads=threads, together=True)
    timings = {}
    try:
        for shape, batch, seq, past, share in SHAPES:
            past = min(past, max_context - seq) if max_context else past
            for worker in workers.values():
                worker.prepare(batch, seq, past)
            times = time_interleaved({n: w.run for n, w in workers.items()}, warmup=1, rounds=100,
                                     budget_s=budget_s * share)
            timings[shape] = {n: round(statistics.median(t) * 1e3, 3) for n, t in times.items()}
    finally:
        close_workers(workers)
    scores = {n: math.exp(statistics.mean(math.log(timings[s][n] / timings[s][default]) for s in timings))
              for n in candidates}
    best = min(scores, key=scores.get)
    chosen = best if scores[best] < 1 - MARGIN else default
    return {"chosen": chosen, "default": default, "scores": {n: round(v, 4) for n, v in scores.items()},
            "median_ms": timings, "budget_s": {s[0]: budget_s * s[4] for s in SHAPES}, "margin": MARGIN,
            "machine": machine_info(threads)}
