"""A/B decode timing that also reports each call's CPU time (time.thread_time of the calling thread) beside its
wall time. With 1 intra-op thread ONNX Runtime runs every kernel on the calling thread, so CPU time is the
work the graph did, without the time the thread waited for a core (on this shared VM, load 3-8 on 2 vCPUs,
a third of the wall time). It does not remove the opening-order penalty: the first-opened worker also
uses more CPU per call (docs/results/speed.md); name the same graph twice for a null control.

    .venv/bin/python scripts/peers/ab_cpu.py A=PATH,B=PATH[,C=PATH...] BATCH CONTEXT ROUNDS SETS

One process per graph, opening order rotated per set, calls interleaved (order alternating per round),
3 warmup calls; the past KV inputs are random (bench_worker.make_feeds; ZERO_PAST=1 for zeros,
which the bench used before it fed random values) and 64-byte aligned (UNALIGNED=1: numpy's own copies). AB_PIN=N pins every worker to CPU N (they never run at the same time, so sharing a CPU
costs them nothing; it rules out a slower vCPU - it did not remove the penalty). Prints per set and pooled
medians (ms) of wall and CPU time, and each graph's ratio to the last one named: of the pooled medians, and the geometric mean of the per-set ratios (with as many sets
opened first by each graph, that cancels a penalty that multiplies the first-opened process's time).
"""
import statistics
import subprocess
import sys
import time


def worker(path: str, batch: int, context: int) -> None:
    import os

    import onnxruntime as ort

    from exporter.timing import worker as bench_worker

    if os.environ.get("AB_PIN"):  # pin this worker to one CPU (both graphs' workers to the same one)
        os.sched_setaffinity(0, {int(os.environ["AB_PIN"])})
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    feeds = bench_worker.make_feeds(s, batch, 1, context, head_dim=64, zero_past=bool(os.environ.get("ZERO_PAST")))
    if os.environ.get("UNALIGNED"):  # numpy's own allocation, as the bench fed before it aligned its feeds
        feeds = {name: value.copy() for name, value in feeds.items()}
    print("ready", flush=True)
    for _ in sys.stdin:
        w, c = time.perf_counter(), time.thread_time()
        s.run(None, feeds)
        print(time.perf_counter() - w, time.thread_time() - c, flush=True)


def main(argv) -> None:
    from exporter.timing import interleaved as bench_timing

    paths = dict(a.split("=", 1) for a in argv[0].split(","))
    batch, context, rounds, sets = (int(x) for x in argv[1:5])
    names = list(paths)
    ref = names[-1]
    pooled = {n: ([], []) for n in names}
    set_ratios = {n: ([], []) for n in names[:-1]}  # per set: wall, cpu ratio to ref
    print(f"batch {batch}, context {context}, {rounds} rounds x {sets} sets, load average {bench_timing.load_average()}")
    for r in range(sets):
        order = names[r % len(names):] + names[:r % len(names)]
        procs = {}
        for n in order:  # open one after another, like ab.py
            procs[n] = subprocess.Popen([sys.executable, __file__, "w", paths[n], str(batch), str(context)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert procs[n].stdout.readline().strip() == "ready"

        def call(n):
            procs[n].stdin.write("r\n")
            procs[n].stdin.flush()
            w, c = procs[n].stdout.readline().split()
            return float(w), float(c)

        for _ in range(3):
            for n in names:
                call(n)
        times = {n: ([], []) for n in names}
        for i in range(rounds):
            for n in (names if i % 2 == 0 else names[::-1]):
                w, c = call(n)
                times[n][0].append(w)
                times[n][1].append(c)
        for p in procs.values():
            p.stdin.close()
            p.wait()
        med = {n: (statistics.median(times[n][0]) * 1e3, statistics.median(times[n][1]) * 1e3) for n in names}
        print(f"  set {r} (opened first: {order[0]}): " + ", ".join(
            f"{n} wall {med[n][0]:.2f} cpu {med[n][1]:.2f}" for n in names) + " | " + ", ".join(
            f"{n}/{ref} wall {med[n][0] / med[ref][0]:.3f} cpu {med[n][1] / med[ref][1]:.3f}" for n in names[:-1]))
        for n in names[:-1]:
            set_ratios[n][0].append(med[n][0] / med[ref][0])
            set_ratios[n][1].append(med[n][1] / med[ref][1])
        for n in names:
            pooled[n][0].extend(times[n][0])
            pooled[n][1].extend(times[n][1])
    med = {n: (statistics.median(pooled[n][0]) * 1e3, statistics.median(pooled[n][1]) * 1e3) for n in names}
    print("pooled medians (ms): " + ", ".join(f"{n} wall {med[n][0]:.2f} cpu {med[n][1]:.2f}" for n in names))
    for n in names[:-1]:
        geo = [statistics.geometric_mean(x) for x in set_ratios[n]]
        print(f"ratio {n}/{ref}: pooled wall {med[n][0] / med[ref][0]:.3f}, cpu {med[n][1] / med[ref][1]:.3f}; "
              f"geometric mean of the sets' ratios wall {geo[0]:.3f}, cpu {geo[1]:.3f}")
    print(f"load average: {bench_timing.load_average()}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "w":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main(sys.argv[1:])
