"""Issue 14's speed bars in one command: our skipped graphs against onnxruntime-genai's builder graphs of the
full model, decode at context 512, interleaved in fresh worker processes (ab.measure), with the machine.

    .venv/bin/python scripts/peers/bars.py OURS_FP32 BUILDER_FP32 OURS_INT4 BUILDER_INT4 [ROUNDS] [SETS]

OURS_FP32: the graph the default recipe's run serves (report.json "served_graph"); OURS_INT4: int4/model.onnx of
recipes/smollm2-135m-int4.yaml; BUILDER_*: scripts/peers/genai_builder.sh's fp32 and int4 (-p int4) graphs.
Rows: fp32 at batch 1 and 4, 1 and 2 threads; int4 at batch 1, 1 and 2 threads. Bar: ours/builder <= 0.97.
With 2 threads each call is followed by an untimed pause (exporter/bench/timing.settle_for; AB_SETTLE_S=0 turns it
off): the idle worker's ONNX Runtime threads spin after its call, on the cores the other worker's call needs.
"""
import statistics
import sys

from ab import measure, settle_s

from exporter.machine import describe_machine, machine_info

BAR = 0.97


def main(argv: list[str]) -> None:
    ours, builder, ours4, builder4 = argv[:4]
    rounds = int(argv[4]) if len(argv) > 4 else 20
    sets = int(argv[5]) if len(argv) > 5 else 6
    print(f"machine: {describe_machine(machine_info())}")
    print(f"decode, context 512, {rounds} rounds x {sets} sets of fresh workers per row; ratio = ours / builder; "
          f"pause after each call: {settle_s(1)} s at 1 thread, {settle_s(2)} s at 2")
    print("| precision | batch | threads | ours ms | builder ms | ratio (pooled) | sets | bar <= 0.97 | load |")
    print("|---|---:|---:|---:|---:|---:|---|:---:|---|")
    rows = [("fp32", ours, builder, b, t) for t in (1, 2) for b in (1, 4)]
    rows += [("int4", ours4, builder4, 1, t) for t in (1, 2)]
    for precision, a, b, batch, threads in rows:
        m = measure({"ours": a, "builder": b}, batch, 512, rounds, sets, threads)
        r = m["ratios"]
        print(f"| {precision} | {batch} | {threads} | {m['pooled']['ours']:.2f} | {m['pooled']['builder']:.2f} | "
              f"{m['ratio']:.3f} | {min(r):.3f}-{max(r):.3f} (median {statistics.median(r):.3f}) | "
              f"{'met' if m['ratio'] <= BAR else 'NOT met'} | {m['machine']['load_average']} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
