"""What an int4 layout costs per decoder layer in ONNX Runtime's MatMulNBits, batch 1: a chain of LAYERS
(SmolLM2's 576 -> 1536 -> 576 MLP shapes) of random weights, one session per layout, calls interleaved.

    .venv/bin/python scripts/peers/nbits_layers.py [ROUNDS] [THREADS] [LAYOUT,...]

Layouts (block 32; accuracy level 4 unless the name ends in "-level1"):
  int4-zp     4-bit weights with uint4 zero points
  int4-sym    4-bit weights without zero points (symmetric: the builder's `-p int4` layout)
  int8-zp     8-bit weights with uint8 zero points (holds a GGUF Q4_1 block within 1/32 of its step)
  int4-means  4-bit + the block means of the input as extra K rows (AveragePool + Concat: the affine graph's
              exact zero-point correction, exporter/onnx/int4.py)
Prints the median ms per chain and per layer, and each layout's time relative to the first.
"""
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, LAYERS, BLOCK = 576, 1536, 30, 32
LAYOUTS = ("int4-zp", "int4-sym", "int8-zp", "int4-means", "int4-zp-level1", "int4-means-level1")


def _matmul_nbits(nodes, inits, x, k, n, bits, name, level, rng, zero_points=True):
    blocks = -(-k // BLOCK)
    inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8), name + "_b"))
    inits.append(numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32), name + "_s"))
    inputs = [x, name + "_b", name + "_s"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * -(-blocks * bits // 8), dtype=np.uint8), name + "_z"))
        inputs.append(name + "_z")
    nodes.append(helper.make_node("MatMulNBits", inputs, [name + "_y"],
                                  domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level))
    return name + "_y"


def chain(layout: str) -> onnx.ModelProto:
    level = 1 if layout.endswith("-level1") else 4
    kind = layout.removesuffix("-level1")
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for layer in range(LAYERS):
        for k, n, tag in ((K, N, "up"), (N, K, "down")):
            name = f"l{layer}_{tag}"
            if kind == "int4-means":
                nodes.append(helper.make_node("AveragePool", [x], [name + "_m"], kernel_shape=[BLOCK], strides=[BLOCK]))
                nodes.append(helper.make_node("Concat", [x, name + "_m"], [name + "_c"], axis=-1))
                x = _matmul_nbits(nodes, inits, name + "_c", k + k // BLOCK, n, 4, name, level, rng)
            else:
                x = _matmul_nbits(nodes, inits, x, k, n, 8 if kind == "int8-zp" else 4, name, level, rng,
                                  zero_points=kind != "int4-sym")
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def main(argv):
    rounds = int(argv[0]) if argv else 20
    threads = int(argv[1]) if len(argv) > 1 else 1
    layouts = argv[2].split(",") if len(argv) > 2 else list(LAYOUTS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(chain(name).SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name in layouts}
    feeds = {"x": np.random.default_rng(1).random((1, 1, K), dtype=np.float32)}
    medians = {name: [] for name in layouts}
    for r in range(rounds):
        for name in layouts if r % 2 == 0 else layouts[::-1]:
            times = []
            for _ in range(10):
                t = time.perf_counter()
                sessions[name].run(None, feeds)
                times.append(time.perf_counter() - t)
            medians[name].append(statistics.median(times))
    from exporter.machine import describe_machine, machine_info

    print(f"{LAYERS} layers of {K} -> {N} -> {K}, batch 1, block {BLOCK}, {rounds} rounds x 10 calls; "
          f"machine: {describe_machine(machine_info(threads))}")
    first = statistics.median(medians[layouts[0]])
    for name in layouts:
        ms = statistics.median(medians[name]) * 1e3
        print(f"  {name:18s} {ms:7.3f} ms  {ms / LAYERS * 1e3:6.1f} us/layer  {ms / (first * 1e3):.3f}x {layouts[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
