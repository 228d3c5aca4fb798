"""A batch-1 decode path for the optimized graph: its MatMuls read unpacked weights, so ONNX Runtime's
one-row kernels run instead of its packed-panel GEMM (fp32, CPU).

Why: ONNX Runtime prepacks the B operand of every MatMul whose weight is a constant 2-D initializer into
MLAS's panel layout; the packed kernel is the fast one for several rows, but a decode step at batch 1
multiplies one row, and MLAS's one-row kernels (`MlasSgemmOperation`, M == 1, for B and for B transposed)
only run on an unpacked B. A 3-D weight [1, K, N] is not prepacked (`GemmPackBFp32` packs 2-D weights
only), so it takes them. Measured on the project's 2-vCPU AMD EPYC machine (`scripts/peers/matmul_kernels.py`:
1 thread, weights streamed from memory as in a decode step; time relative to the packed kernel), one row:
[576, 49152] (SmolLM2's LM head) 0.71 unpacked / 1.12 unpacked-transposed, [576, 1536] 0.79 / 0.99,
[576, 960] 0.90 / 1.02, [1536, 576] (the MLP's down projection) 1.07 / 0.89, [576, 576] 1.05 / 1.06. So the
batch-1 branch reads B as is where K <= N and B transposed (FusedMatMul transB=1) where K > N. With 4 rows
the unpacked kernels are 1.8-3.4x *slower* (they pack B on every call) and a 128-token prompt 8-35% slower,
hence a dispatch rather than one layout for every call:

    If(Size(input_ids) == 1)
      then: the graph with every constant-weight MatMul reading an unpacked 3-D weight
      else: the graph as it was (packed weights: prompts, batch > 1)

Where the layout wanted is the weight's own, the 3-D weight is a view: same external data bytes (location,
offset, length), nothing new. Where it is not (the MLP's down projections; a tied LM head, which the graph
reads as Transpose(embedding)), a transposed copy goes to `model.opt.onnx.data`: 106 MB + 113 MB more on
disk for SmolLM2-135M. The cost is memory: ORT keeps its packed copies for the else branch, and the then
branch reads its weights from the data files (memory-mapped by ORT, resident once a batch-1 step has run),
so resident memory grows by about the weights' size. fp32 only: the kernels above are fp32 ones.
`export.batch1_decode_path: false` in a recipe leaves the branch out.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx.graph import (branch_outputs, drop_dead_nodes, external_initializer, general_branch,
                                 initializer_array)

ROW = "m1/"  # prefix of the batch-1 branch's value and node names (values must be unique across branches)
GENERAL = "general/"  # prefix of the else branch's output names (they cannot reuse the If's output names)
ALIGN = 4096  # new tensors in the data file start on a page boundary (where a memory mapping can start)


def add_batch1_path(proto, data_path: Path, model_dir: Path) -> int:
    """Rewrite `proto` (fp32) into the If dispatch above; returns how many MatMuls the batch-1 branch reads
    unpacked (0: nothing to gain, `proto` left as it was). New transposed weights are appended to
    `data_path` (created if missing); `model_dir` is where the external data of `proto` lives."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    outer = set(inits) | {i.name for i in g.input} | {""}
    producer = {o: n for n in g.node for o in n.output}

    def weight(name):  # a 2-D fp32 initializer, or None
        t = inits.get(name)
        return t if t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT else None

    # per MatMul: (node, source weight, is the MatMul's B the source transposed?)
    plans = []
    for n in g.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        b = n.input[1]
        if weight(b) is not None:
            plans.append((n, b, False))
        elif (t := producer.get(b)) is not None and t.op_type == "Transpose" and weight(t.input[0]) is not None \
                and list(next((a.ints for a in t.attribute if a.name == "perm"), [1, 0])) == [1, 0]:
            plans.append((n, t.input[0], True))
    if not plans:
        return 0

    new_inits, made, rewire = [], set(), {}
    for n, w, b_is_transposed in plans:
        rows, cols = inits[w].dims
        k, n_out = (cols, rows) if b_is_transposed else (rows, cols)  # B is [K, N]
        # the layout the one-row kernel reads fastest (module docstring): B^T for K > N, B otherwise
        want_bt = k > n_out
        if want_bt == b_is_transposed:  # the source already has that layout: a view, no new bytes
            name = ROW + w
            if name not in made:
                v = copy.deepcopy(inits[w])
                v.name, v.dims[:] = name, [1, *inits[w].dims]
                new_inits.append(v)
                made.add(name)
        else:  # a transposed copy, appended to the data file
            name = ROW + w + ".T"
            if name not in made:
                value = np.ascontiguousarray(initializer_array(inits[w], model_dir).T)[None]
                _append_external(value, name, data_path, new_inits)
                made.add(name)
        rewire[id(n)] = name, want_bt

    outputs = {o.name for o in g.output}

    def row_name(x):
        return x if x in outer else ROW + x

    then_nodes = []
    for n in g.node:
        c = copy.deepcopy(n)
        c.name = ROW + (n.name or n.op_type)
        c.input[:] = [row_name(x) for x in n.input]
        c.output[:] = [ROW + x if x else x for x in n.output]
        if id(n) in rewire:
            c.input[1], bt = rewire[id(n)]
            if bt:  # MatMul has no transB: ORT's FusedMatMul is MatMul with one (also not prepacked in 3-D)
                c.op_type, c.domain = "FusedMatMul", "com.microsoft"
                c.attribute.append(helper.make_attribute("transB", 1))
        then_nodes.append(c)
    else_nodes, else_outputs = general_branch(g, GENERAL)
    then_g = helper.make_graph(then_nodes, "batch1_unpacked_weights", [], branch_outputs(g, ROW))
    else_g = helper.make_graph(else_nodes, "general_packed_weights", [], else_outputs)
    else_g.value_info.extend(v for v in g.value_info if v.name not in outputs)
    drop_dead_nodes(then_g)  # the Transpose the LM head no longer reads (the body was sorted: order kept)

    one = "batch1_dispatch/one"
    g.initializer.extend(new_inits)
    g.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), one))
    del g.value_info[:]
    del g.node[:]
    g.node.extend([
        helper.make_node("Size", ["input_ids"], ["batch1_dispatch/size"], name="batch1_dispatch/size"),
        helper.make_node("Equal", ["batch1_dispatch/size", one], ["batch1_dispatch/one_row"], name="batch1_dispatch/one_row"),
        helper.make_node("If", ["batch1_dispatch/one_row"], [o.name for o in g.output], name="batch1_dispatch",
                         then_branch=then_g, else_branch=else_g),
    ])
    return len(plans)


def _append_external(value, name: str, data_path: Path, new_inits: list) -> None:
    """Append `value` to `data_path` at a page-aligned offset as external initializer `name`."""
    data_path.touch()
    with open(data_path, "r+b") as fh:
        fh.seek(0, 2)
        offset = -(-fh.tell() // ALIGN) * ALIGN
        fh.truncate(offset)
        fh.seek(offset)
        fh.write(value.tobytes())
    new_inits.append(external_initializer(value, name, data_path.name, offset))
