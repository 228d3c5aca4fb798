"""Why the optimized graph has a batch-1 branch (exporter/gemv.py): one fp32 MatMul per SmolLM2 weight shape,
timed in ONNX Runtime (CPU, 1 intra-op thread) with the weight as ORT prepacks it (a 2-D initializer), as an
unpacked [1, K, N] view (MLAS's one-row kernel), and as an unpacked transposed view (FusedMatMul transB=1,
MLAS's one-row kernel for a transposed B), for 1 row (batch-1 decode), 4 rows (batch-4 decode) and 128 rows
(a prompt). The three sessions' calls are interleaved; medians, and each layout's ratio to the packed one.
A decode step streams its weights from memory, not from cache: each graph holds as many distinct weights of
the shape as fill 128 MiB (several times the 16 MiB L3 here), all multiplied by the same input, and the time
is per MatMul.

    .venv/bin/python scripts/peers/matmul_kernels.py [ROUNDS]
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(576, 960), (576, 576), (576, 1536), (1536, 576), (576, 49152)]  # qkv, o, gate/up, down, LM head
ROWS = [1, 4, 128]


STREAM_BYTES = 128 * 2**20


def session(k: int, make_node, weights: list):
    """One graph: make_node(weight name, output name) for every weight, all on input x."""
    nodes = [make_node(f"w{i}", f"y{i}") for i in range(len(weights))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(rounds: int) -> None:
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, 1 thread, up to {rounds} interleaved rounds; median us per MatMul")
    print("| K x N | rows | packed 2-D | unpacked [1,K,N] | unpacked transposed | unpacked / packed | transposed / packed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, n in SHAPES:
        copies = max(1, -(-STREAM_BYTES // (k * n * 4)))
        ws = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(copies)]
        matmul = lambda w, y: helper.make_node("MatMul", ["x", w], [y])  # noqa: E731
        fused_t = lambda w, y: helper.make_node("FusedMatMul", ["x", w], [y], domain="com.microsoft", transB=1)  # noqa: E731
        sessions = {
            "packed": session(k, matmul, ws),
            "unpacked": session(k, matmul, [w[None] for w in ws]),
            "transposed": session(k, fused_t, [np.ascontiguousarray(w.T)[None] for w in ws]),
        }
        for rows in ROWS:
            x = rng.standard_normal((1, rows, k), dtype=np.float32)
            ref = sessions["packed"].run(None, {"x": x})
            for name, s in sessions.items():  # same products from every layout
                assert all(np.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(s.run(None, {"x": x}), ref)), name
            work = k * n * rows * copies
            reps = max(3, min(rounds, int(rounds * 3e7 / work)))
            times = {name: [] for name in sessions}
            for r in range(reps):
                for name in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                    t = time.perf_counter()
                    sessions[name].run(None, {"x": x})
                    times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) * 1e6 / copies for name, v in times.items()}
            print(f"| {k} x {n} | {rows} | {med['packed']:.0f} | {med['unpacked']:.0f} | {med['transposed']:.0f} | "
                  f"{med['unpacked'] / med['packed']:.2f} | {med['transposed'] / med['packed']:.2f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
