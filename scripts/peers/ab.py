"""Focused A/B decode timing of two (or more) ONNX graphs: one process per graph, interleaved calls, repeated
over fresh sets of processes whose opening order rotates (the first process opened is sometimes slower on
this shared VM), times pooled. Prints each set's medians, the pooled medians and the ratio first/second.

    .venv/bin/python scripts/peers/ab.py ours=PATH,genai=PATH BATCH CONTEXT ROUNDS SETS [THREADS]

docs/results/speed.md uses it for the bar cases (decode, batch 1, contexts 512 and 2048) with 8-12 sets.
"""

import statistics
import sys

from exporter.bench import timing as bench_timing
from exporter.bench import worker as bench_worker


def main(argv: list[str]) -> None:
    paths = dict(a.split("=", 1) for a in argv[0].split(","))
    batch, context, rounds, sets = (int(x) for x in argv[1:5])
    threads = int(argv[5]) if len(argv) > 5 else 1
    names = list(paths)
    pooled = {n: [] for n in names}
    per_set = []
    for r in range(sets):
        order = names[r % len(names):] + names[:r % len(names)]
        workers = bench_worker.open_workers({n: paths[n] for n in order}, threads=threads, head_dim=64)
        try:
            for w in workers.values():
                w.prepare(batch, 1, context)
            times = bench_timing.time_interleaved({n: workers[n].run for n in names}, warmup=3, rounds=rounds)
        finally:
            bench_worker.close_workers(workers)
        per_set.append({n: round(statistics.median(t) * 1e3, 2) for n, t in times.items()})
        for n in names:
            pooled[n] += times[n]
    medians = {n: statistics.median(t) * 1e3 for n, t in pooled.items()}
    ratios = [s[names[0]] / s[names[1]] for s in per_set]
    print(f"threads {threads}, batch {batch}, context {context}, {rounds} rounds x {sets} sets; opened first: "
          + ", ".join(s for s in (names[r % len(names)] for r in range(sets))))
    for s, q in zip(per_set, ratios):
        print(f"  set: {s}  {names[0]}/{names[1]} {q:.3f}")
    print(f"pooled medians (ms): { {n: round(v, 2) for n, v in medians.items()} }")
    print(f"ratio {names[0]}/{names[1]}: pooled {medians[names[0]] / medians[names[1]]:.3f}, "
          f"median of sets {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    print(f"load average: {bench_timing.load_average()}")


if __name__ == "__main__":
    main(sys.argv[1:])
