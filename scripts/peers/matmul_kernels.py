"""Why the optimized graph dispatches one-row MatMuls (exporter/onnx/gemv.py): one fp32 MatMul per SmolLM2
weight shape, timed in ONNX Runtime (CPU) with the weight as ORT prepacks it (a 2-D initializer), as an
unpacked [1, K, N] view (MLAS's one-row kernel), and as an unpacked transposed view (FusedMatMul transB=1,
MLAS's one-row kernel for a transposed B), for 1 row (batch-1 decode), 4 rows (batch-4 decode) and 128 rows
(a prompt). The timing is the optimize stage's own (exporter/timing/kernels.py: weights streamed from memory,
the three layouts' calls interleaved); medians per MatMul, and each layout's ratio to the packed one.

    .venv/bin/python scripts/peers/matmul_kernels.py [ROUNDS] [THREADS]
"""
import sys

import onnxruntime as ort

from exporter.timing.kernels import copies_for, stream_bytes, time_layouts

SHAPES = [(576, 960), (576, 576), (576, 1536), (1536, 576), (576, 49152)]  # qkv, o, gate/up, down, LM head
ROWS = [1, 4, 128]


def main(rounds: int, threads: int) -> None:
    print(f"onnxruntime {ort.__version__}, {threads} thread(s), up to {rounds} interleaved rounds; median us per MatMul")
    print("| K x N | rows | packed 2-D | unpacked [1,K,N] | unpacked transposed | unpacked / packed | transposed / packed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, n in SHAPES:
        for rows in ROWS:
            work = k * n * rows * copies_for(k, n, stream_bytes())  # multiply-adds per call
            us = time_layouts(k, n, rows, threads, budget_s=None, rounds=max(3, min(rounds, int(rounds * 3e7 / work))))
            print(f"| {k} x {n} | {rows} | {us['packed']:.0f} | {us['unpacked']:.0f} | {us['transposed']:.0f} | "
                  f"{us['unpacked'] / us['packed']:.2f} | {us['transposed'] / us['packed']:.2f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
