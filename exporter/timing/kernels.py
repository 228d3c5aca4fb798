"""Which layout ONNX Runtime's fp32 MatMul reads fastest for one row, per weight shape, on the machine that builds.

A decode step at batch 1 multiplies one row by every weight. ONNX Runtime prepacks a constant 2-D weight into
MLAS's panel layout; a 3-D view [1, K, N] is not prepacked and runs MLAS's one-row kernel, and so does a
transposed 3-D view under FusedMatMul(transB=1) (onnx/gemv.py). Which of the three is fastest depends on the
CPU and the shape: on the 2-vCPU AMD EPYC (AVX-512) of issue 14 only SmolLM2's LM head [576, 49152] read
unpacked beat the packed kernel (0.78x at 1 thread, 0.92x at 2), every other shape lost 1.2-1.7x; on the EPYC
the batch-1 branch was first tuned on, most shapes won. So the optimize stage times the shapes here (as
TensorRT times its tactics) and rewrites only the MatMuls whose shape won (onnx/gemv.py, add_one_row_dispatch).

Each layout gets a graph of as many distinct weights of the shape as fill twice the L3 cache (at least 64 MiB;
at most MAX_COPIES weights), all multiplied by the same row, so the weights stream from memory as in a decode
step; the three sessions' calls are interleaved, alternating order per round; the figure is the median time per MatMul.
`scripts/peers/matmul_kernels.py` prints the same table for 1, 4 and 128 rows.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from exporter.timing.interleaved import time_interleaved
from exporter.machine import machine_info
from exporter.onnx.session import open_session

STREAM_BYTES = 64 * 2**20  # at least; twice the last-level cache where the OS reports it (stream_bytes())
MAX_COPIES = 256  # tiny shapes (test models: kilobytes) stop there: their weights sit in cache in a real step too
MARGIN = 0.03  # a one-row layout must beat packed by this much to be proposed (the whole-graph timing then decides)


def stream_bytes() -> int:
    """Bytes of weights per timed call: twice the L3 cache (sysfs) and at least STREAM_BYTES, so they stream."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        l3 = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    except (OSError, ValueError):
        l3 = 0
    return max(STREAM_BYTES, 2 * l3)


def copies_for(k: int, n: int, stream: int) -> int:
    """How many distinct [k, n] fp32 weights one timed call multiplies: enough to fill `stream` bytes."""
    return min(MAX_COPIES, max(1, -(-stream // (k * n * 4))))


def layout_sessions(k: int, n: int, threads: int, stream: int, seed: int = 0):
    """{layout: InferenceSession} for weights of shape [k, n] (as many copies as fill `stream` bytes), and
    the number of copies each session multiplies per call."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    copies = copies_for(k, n, stream)
    weights = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(copies)]
    forms = {
        "packed": (lambda w, y: helper.make_node("MatMul", ["x", w], [y]), weights),
        "unpacked": (lambda w, y: helper.make_node("MatMul", ["x", w], [y]), [w[None] for w in weights]),
        "transposed": (lambda w, y: helper.make_node("FusedMatMul", ["x", w], [y], domain="com.microsoft", transB=1),
                       [np.ascontiguousarray(w.T)[None] for w in weights]),
    }
    sessions = {}
    for layout, (make_node, values) in forms.items():
        graph = helper.make_graph(
            [make_node(f"w{i}", f"y{i}") for i in range(copies)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
            [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(copies)],
            [numpy_helper.from_array(v, f"w{i}") for i, v in enumerate(values)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        sessions[layout] = open_session(model, threads)
    return sessions, copies


def time_layouts(k: int, n: int, rows: int, threads: int, budget_s: float | None, rounds: int = 60,
                 stream: int | None = None) -> dict[str, float]:
    """{layout: median microseconds per MatMul} for `rows` rows times a [k, n] weight; the three layouts' products
    are checked equal first (a layout that computed something else would be a bug, not a faster kernel)."""
    sessions, copies = layout_sessions(k, n, threads, stream or stream_bytes())
    x = np.random.default_rng(1).standard_normal((1, rows, k), dtype=np.float32)
    reference = sessions["packed"].run(None, {"x": x})
    for layout, session in sessions.items():
        if not all(np.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(session.run(None, {"x": x}), reference)):
            raise RuntimeError(f"the {layout} MatMul of a [{k}, {n}] weight disagrees with the packed one")
    calls = {layout: (lambda s=session: s.run(None, {"x": x})) for layout, session in sessions.items()}
    times = time_interleaved(calls, warmup=2, rounds=rounds, budget_s=budget_s)
    return {layout: round(statistics.median(t) * 1e6 / copies, 2) for layout, t in times.items()}


def one_row_layouts(shapes, threads: int = 1, budget_s: float = 0.5, margin: float = MARGIN) -> dict:
    """Time one row against each weight shape (K, N) in its three layouts; per shape, the layout chosen (packed
    unless another is more than `margin` faster) and the timings, with the machine they were taken on."""
    shapes = sorted({(int(k), int(n)) for k, n in shapes})
    timings, chosen = {}, {}
    for k, n in shapes:
        us = time_layouts(k, n, 1, threads, budget_s)
        best = min(us, key=us.get)
        chosen[(k, n)] = best if us[best] < (1 - margin) * us["packed"] else "packed"
        timings[f"{k}x{n}"] = us
    return {"layouts": chosen, "median_us_per_matmul": timings, "margin": margin, "budget_s_per_shape": budget_s,
            "machine": machine_info(threads)}
