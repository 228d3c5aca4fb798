"""Like ab.py, but each worker runs with ONNX Runtime io-binding (inputs bound once, outputs left in ORT),
so the Python binding's per-call output copies are not timed. Two graphs, batch 1, opening order alternating.

    .venv/bin/python scripts/peers/ab_iobinding.py ours=PATH,genai=PATH CONTEXT ROUNDS SETS
"""
import sys, time, statistics, subprocess
# worker mode
if sys.argv[1] == "w":
    import onnxruntime as ort
    from exporter.timing import worker as bench_worker
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.log_severity_level = 3
    s = ort.InferenceSession(sys.argv[2], o, providers=["CPUExecutionProvider"])
    f = bench_worker.make_feeds(s, 1, 1, int(sys.argv[3]), head_dim=64)
    b = s.io_binding()
    for k, v in f.items(): b.bind_cpu_input(k, v)
    for out in s.get_outputs(): b.bind_output(out.name, "cpu")
    for line in sys.stdin:
        t = time.perf_counter(); s.run_with_iobinding(b); dt = time.perf_counter() - t
        print(dt, flush=True)
    sys.exit()
paths = dict(a.split("=", 1) for a in sys.argv[1].split(",")); ctx = int(sys.argv[2]); rounds = int(sys.argv[3]); sets = int(sys.argv[4])
names = list(paths); pooled = {n: [] for n in names}; per = []
for r in range(sets):
    order = names[r % 2:] + names[:r % 2]
    W = {n: subprocess.Popen([sys.executable, __file__, "w", paths[n], str(ctx)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for n in order}

    def call(n):
        W[n].stdin.write("r\n"); W[n].stdin.flush(); return float(W[n].stdout.readline())
    for _ in range(3):
        for n in names: call(n)
    T = {n: [] for n in names}
    for i in range(rounds):
        for n in (names if i % 2 == 0 else names[::-1]): T[n].append(call(n))
    for w in W.values(): w.stdin.close(); w.wait()
    per.append(round(statistics.median(T[names[0]]) / statistics.median(T[names[1]]), 3))
    for n in names: pooled[n] += T[n]
m = {n: statistics.median(v) * 1e3 for n, v in pooled.items()}
print("per-set ratios", per, "pooled", {n: round(v, 2) for n, v in m.items()}, round(m[names[0]] / m[names[1]], 3))
