"""A/B decode timing of several graphs, each in a fresh worker process per set (opening order rotated per set),
calls interleaved (order alternating per round), 3 warmup calls; pooled medians and per-set ratios of the first
graph named to the second; the machine (CPU model, ISA flags, ONNX Runtime, threads, load) printed with them.

    .venv/bin/python scripts/peers/ab.py A=PATH,B=PATH[,C=PATH...] BATCH CONTEXT ROUNDS SETS [THREADS]

`bars.py` runs the issue-14 bar table with `measure`.
"""
import os
import statistics
import sys

from exporter.timing import interleaved as bench_timing
from exporter.timing import worker as bench_worker
from exporter.machine import describe_machine, machine_info


def settle_s(threads: int) -> float:
    """Untimed pause after each call (timing.interleaved.settle_for: 0.1 s with several threads); AB_SETTLE_S overrides."""
    return float(os.environ.get("AB_SETTLE_S", bench_timing.settle_for(threads)))


def measure(paths: dict, batch: int, context: int, rounds: int, sets: int, threads: int = 1) -> dict:
    """{"per_set": [{name: median ms}], "pooled": {name: median ms}, "ratios": [first/second per set],
    "ratio": pooled first/second, "machine": ...}."""
    names = list(paths)
    pooled = {n: [] for n in names}
    per_set = []
    for r in range(sets):
        order = names[r % len(names):] + names[:r % len(names)]
        workers = bench_worker.open_workers({n: paths[n] for n in order}, threads=threads, head_dim=64)
        try:
            for w in workers.values():
                w.prepare(batch, 1, context)
            times = bench_timing.time_interleaved({n: workers[n].run for n in names}, warmup=3, rounds=rounds,
                                                  settle_s=settle_s(threads))
        finally:
            bench_worker.close_workers(workers)
        per_set.append({n: round(statistics.median(t) * 1e3, 2) for n, t in times.items()})
        for n in names:
            pooled[n] += times[n]
    medians = {n: statistics.median(t) * 1e3 for n, t in pooled.items()}
    return {"per_set": per_set, "pooled": medians, "ratios": [s[names[0]] / s[names[1]] for s in per_set],
            "ratio": medians[names[0]] / medians[names[1]], "opened_first": [names[r % len(names)] for r in range(sets)],
            "machine": machine_info(threads)}


def main(argv: list[str]) -> None:
    paths = dict(a.split("=", 1) for a in argv[0].split(","))
    batch, context, rounds, sets = (int(x) for x in argv[1:5])
    threads = int(argv[5]) if len(argv) > 5 else 1
    names = list(paths)
    m = measure(paths, batch, context, rounds, sets, threads)
    print(f"threads {threads}, batch {batch}, context {context}, {rounds} rounds x {sets} sets; opened first: "
          + ", ".join(m["opened_first"]))
    for s, q in zip(m["per_set"], m["ratios"]):
        print(f"  set: {s}  {names[0]}/{names[1]} {q:.3f}")
    print(f"pooled medians (ms): { {n: round(v, 2) for n, v in m['pooled'].items()} }")
    print(f"ratio {names[0]}/{names[1]}: pooled {m['ratio']:.3f}, median of sets {statistics.median(m['ratios']):.3f}, "
          f"range {min(m['ratios']):.3f}-{max(m['ratios']):.3f}")
    print(f"machine: {describe_machine(machine_info(threads))}")


if __name__ == "__main__":
    main(sys.argv[1:])
