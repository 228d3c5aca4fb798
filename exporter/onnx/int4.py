"""quantize_int4(source.onnx, out.onnx): weight-only int4 of an fp32 graph, with ONNX Runtime's own quantizer.

Every MatMul whose B is a constant 2-D initializer becomes `com.microsoft.MatMulNBits` (4-bit weights, blocks of
`block_size` along K, symmetric, one fp32 scale per block: `onnxruntime.quantization.matmul_nbits_quantizer`,
round-to-nearest, the same quantizer onnxruntime-genai's builder calls for `-p int4`). Activations, norms,
attention and the KV cache stay fp32. `accuracy_level` is MatMulNBits' own attribute: 4 quantizes the activations
to int8 per block for the dot products (the fast CPU kernel), 0 leaves it unset (fp32 compute).

The tied LM head of our graphs is `MatMul(h, Transpose(embedding))`, which the quantizer does not see as a
constant weight: it is materialised as its own initializer first, so it is quantized like every other MatMul
(`lm_head=False` keeps it fp32). The embedding Gather stays fp32 (it reads one row per token: quantizing it saves
memory, not time); the builder instead shares the LM head's int4 weight with a GatherBlockQuantized.

The source is the optimized graph without the batch-1 branch (MatMulNBits has no packed/unpacked split to
dispatch on), so the int4 graph has the optimized graph's fused attention and norms.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.onnx.contract import data_path
from exporter.onnx.graph import initializer_array

LM_HEAD_WEIGHT = "int4.lm_head.weight"  # the materialised [hidden, vocab] LM head


def materialize_transposed_weights(proto, model_dir: Path) -> list[str]:
    """`MatMul(x, Transpose(W))` with W a 2-D initializer -> `MatMul(x, W^T)` with W^T a new initializer, so the
    quantizer sees a constant weight; returns the MatMuls rewired (the tied LM head, in our graphs)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rewired = []
    for n in g.node:
        t = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits or len(inits[t.input[0]].dims) != 2:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        value = np.ascontiguousarray(initializer_array(inits[t.input[0]], model_dir).T)
        name = LM_HEAD_WEIGHT if not rewired else f"{LM_HEAD_WEIGHT}.{len(rewired)}"
        g.initializer.append(numpy_helper.from_array(value, name))
        n.input[1] = name
        rewired.append(n.name)
    return rewired


def lm_head_nodes(proto) -> list[str]:
    """The MatMuls whose constant weight has the vocabulary as its output width (the logits' last dim)."""
    logits = next(o for o in proto.graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2 and shapes[n.input[1]][1] == vocab]


def quantize_int4(source: Path, out_path: Path, block_size: int = 32, accuracy_level: int = 4,
                  lm_head: bool = True) -> dict:
    """Write the int4 graph of `source` (fp32, external data beside it) to `out_path` + `out_path.data`;
    returns what was quantized."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # importing it calls logging.basicConfig(level=INFO): every library's INFO lines (a line per node) would print
    root.setLevel(level)
    root.handlers[:] = handlers
    source, out_path = Path(source), Path(out_path)
    proto = onnx.load(str(source), load_external_data=False)
    materialize_transposed_weights(proto, source.parent)
    head = lm_head_nodes(proto)
    onnx.load_external_data_for_model(proto, str(source.parent))
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level or None,
                                     nodes_to_exclude=[] if lm_head else head)
    quantizer.process()
    out = quantizer.model.model
    del proto
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path(out_path).unlink(missing_ok=True)
    onnx.save(out, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_path(out_path).name, size_threshold=1024)
    mask = os.umask(0)
    os.umask(mask)
    data_path(out_path).chmod(0o666 & ~mask)  # onnx writes external data 0600; the other files follow the umask
    ops = [n.op_type for n in out.graph.node]
    return {"matmul_nbits": ops.count("MatMulNBits"), "matmul_fp32": ops.count("MatMul"),
            "block_size": block_size, "accuracy_level": accuracy_level,
            "lm_head": "int4" if lm_head and head else "fp32", "embedding": "fp32 (Gather)"}
