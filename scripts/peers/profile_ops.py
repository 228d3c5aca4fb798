"""ORT profile of decode steps: per-op-type kernel time per step (sum over the type's nodes of each node's
median), and the step's total (model_run) split into
kernel time and the rest (executor/framework overhead), for one or more graphs (each in its own process).

    .venv/bin/python scripts/peers/profile_ops.py NAME=PATH[,NAME=PATH...] [CONTEXT] [STEPS] [BATCH]

Batch 1 decode by default, 1 intra-op thread (PROFILE_THREADS=N for N), default graph optimizations (ab.py's settings). Graphs are
profiled one after another, in the order given, then again in reverse (two runs each).
Past KV inputs random (bench_worker.make_feeds; ZERO_PAST=1 for zeros, as in the runs before it).
PROFILE_BIND_OUTPUTS=1: io-binding, inputs bound once and every output written into the same preallocated
buffer each step (so the graphs' present outputs sit at fixed addresses, not wherever ORT's arena puts them).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict


def worker(path: str, context: int, steps: int, batch: int, prefix: str) -> None:
    import onnxruntime as ort

    from exporter.timing import worker as bench_worker

    o = ort.SessionOptions()
    o.intra_op_num_threads = int(os.environ.get("PROFILE_THREADS", "1"))
    o.log_severity_level = 3
    o.enable_profiling = True
    o.profile_file_prefix = prefix
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    feeds = bench_worker.make_feeds(s, batch, 1, context, head_dim=64, zero_past=bool(os.environ.get("ZERO_PAST")))
    run = lambda: s.run(None, feeds)  # noqa: E731
    if os.environ.get("PROFILE_BIND_OUTPUTS"):  # outputs written into the same preallocated buffers every step
        import numpy as np

        first = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
        bufs = {name: np.empty_like(value) for name, value in first.items()}
        binding = s.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for name, buf in bufs.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        run = lambda: s.run_with_iobinding(binding)  # noqa: E731
    for _ in range(5):
        run()
    for _ in range(steps):
        run()
    print(s.end_profiling())


def summarize(profile: str, steps: int) -> dict:
    events = json.load(open(profile))
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    runs = runs[-steps:]
    start = runs[0]["ts"]
    per_node = defaultdict(list)
    op_of = {}
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith("_kernel_time"):
            continue
        per_node[e["name"]].append(e["dur"])
        op_of[e["name"]] = e["args"].get("op_name", "?")
    # per op type: the sum over its nodes of each node's median time (robust to the steps a busy VM preempted)
    per_op = defaultdict(float)
    for name, durs in per_node.items():
        per_op[op_of[name]] += statistics.median(durs) * steps
    kernel_total = sum(per_op.values())
    run_ms = [r["dur"] / 1e3 for r in runs]
    return {"model_run_median_ms": statistics.median(run_ms), "model_run_mean_ms": sum(run_ms) / len(run_ms),
            "kernels_ms_per_step": kernel_total / 1e3 / steps,
            "per_op_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def main(argv):
    paths = dict(a.split("=", 1) for a in argv[0].split(","))
    context = int(argv[1]) if len(argv) > 1 else 512
    steps = int(argv[2]) if len(argv) > 2 else 200
    batch = int(argv[3]) if len(argv) > 3 else 1
    tmp = tempfile.mkdtemp(prefix="profile_ops_")
    names = list(paths)
    results = defaultdict(list)
    for name in names + names[::-1]:
        out = subprocess.run([sys.executable, __file__, "w", paths[name], str(context), str(steps), str(batch),
                              f"{tmp}/{name}"], capture_output=True, text=True, check=True).stdout.split()[-1]
        results[name].append(summarize(out, steps))
    for name in names:
        for r in results[name]:
            print(f"{name}: model_run median {r['model_run_median_ms']:.2f} ms, mean {r['model_run_mean_ms']:.2f}, "
                  f"kernels {r['kernels_ms_per_step']:.2f} ms/step, rest {r['model_run_mean_ms'] - r['kernels_ms_per_step']:.2f}")
    ops = sorted({op for rs in results.values() for r in rs for op in r["per_op_ms_per_step"]},
                 key=lambda op: -results[names[0]][0]["per_op_ms_per_step"].get(op, 0))
    print("op type: ms per step, " + " | ".join(f"{n} (runs)" for n in names))
    for op in ops:
        print(f"  {op:36s} " + " | ".join(" ".join(f"{r['per_op_ms_per_step'].get(op, 0):7.3f}" for r in results[n])
                                          for n in names))
    from exporter.timing import interleaved as bench_timing
    print("load average:", bench_timing.load_average())


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "w":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main(sys.argv[1:])
