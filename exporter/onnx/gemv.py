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

Where only some shapes gain on the CPU that builds (the AVX-512 EPYC of issue 14: the LM head alone), the optimize
stage also builds `add_one_row_dispatch`: an If around each such MatMul in the decode body, with the layout per
shape timed there (exporter/timing/kernels.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx.decode import decode_body
from exporter.onnx.graph import (branch_outputs, drop_dead_nodes, external_initializer, general_branch,
                                 initializer_array)

ONE_ROW = "row1/"  # prefix of the one-row dispatches' names (add_one_row_dispatch)
ROW = "m1/"  # prefix of the batch-1 branch's value and node names (values must be unique across branches)
GENERAL = "general/"  # prefix of the else branch's output names (they cannot reuse the If's output names)
ALIGN = 4096  # new tensors in the data file start on a page boundary (where a memory mapping can start)


def matmul_weights(graph, inits: dict) -> list[tuple]:
    """The MatMuls of `graph` with a constant fp32 weight: (node, source initializer name, is the MatMul's B the
    source transposed?), B being a 2-D initializer of `inits` or a Transpose of one (the tied LM head)."""
    producer = {o: n for n in graph.node for o in n.output}

    def weight(name):  # a 2-D fp32 initializer, or None
        t = inits.get(name)
        return t if t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT else None

    plans = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        b = n.input[1]
        if weight(b) is not None:
            plans.append((n, b, False))
        elif (t := producer.get(b)) is not None and t.op_type == "Transpose" and weight(t.input[0]) is not None \
                and list(next((a.ints for a in t.attribute if a.name == "perm"), [1, 0])) == [1, 0]:
            plans.append((n, t.input[0], True))
    return plans


def b_shape(inits: dict, w: str, b_is_transposed: bool) -> tuple[int, int]:
    """(K, N) of the MatMul's B."""
    rows, cols = inits[w].dims
    return (cols, rows) if b_is_transposed else (rows, cols)


def matmul_weight_shapes(path: Path) -> set[tuple[int, int]]:
    """The (K, N) of every constant-weight MatMul a one-token call of the graph at `path` runs."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    return {b_shape(inits, w, bt) for _, w, bt in matmul_weights(decode_body(proto.graph), inits)}


class OneRowWeights:
    """The unpacked 3-D weights a one-row MatMul reads, each made once: a view of the source's bytes where the
    layout wanted is the source's own, else a transposed copy appended to `data_path`."""

    def __init__(self, inits: dict, data_path: Path, model_dir: Path, prefix: str):
        self.inits, self.data_path, self.model_dir, self.prefix = inits, data_path, model_dir, prefix
        self.new_inits, self.made = [], set()

    def get(self, w: str, b_is_transposed: bool, want_bt: bool) -> str:
        src = self.inits[w]
        if want_bt == b_is_transposed:  # the source already has that layout: a view, no new bytes
            name = self.prefix + w
            if name not in self.made:
                v = copy.deepcopy(src)
                v.name, v.dims[:] = name, [1, *src.dims]
                self.new_inits.append(v)
        else:
            name = self.prefix + w + ".T"
            if name not in self.made:
                value = np.ascontiguousarray(initializer_array(src, self.model_dir).T)[None]
                _append_external(value, name, self.data_path, self.new_inits)
        self.made.add(name)
        return name


def one_row_node(node, weight: str, want_bt: bool, output: str, name: str):
    """`node` (a MatMul) reading the unpacked weight: MatMul on [1, K, N], or FusedMatMul transB=1 on [1, N, K]
    (MatMul has no transB; ORT's FusedMatMul is MatMul with one, and is not prepacked in 3-D either)."""
    c = helper.make_node("MatMul", [node.input[0], weight], [output], name=name)
    if want_bt:
        c.op_type, c.domain = "FusedMatMul", "com.microsoft"
        c.attribute.append(helper.make_attribute("transB", 1))
    return c


def add_batch1_path(proto, data_path: Path, model_dir: Path) -> int:
    """Rewrite `proto` (fp32) into the If dispatch above; returns how many MatMuls the batch-1 branch reads
    unpacked (0: nothing to gain, `proto` left as it was). New transposed weights are appended to
    `data_path` (created if missing); `model_dir` is where the external data of `proto` lives."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    outer = set(inits) | {i.name for i in g.input} | {""}
    plans = matmul_weights(g, inits)
    if not plans:
        return 0

    weights, rewire = OneRowWeights(inits, data_path, model_dir, ROW), {}
    for n, w, b_is_transposed in plans:
        k, n_out = b_shape(inits, w, b_is_transposed)
        # the layout the one-row kernel read fastest where this branch was tuned (module docstring)
        want_bt = k > n_out
        rewire[id(n)] = weights.get(w, b_is_transposed, want_bt), want_bt
    new_inits = weights.new_inits

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
            c = one_row_node(c, *rewire[id(n)], c.output[0], c.name)
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


def add_one_row_dispatch(proto, data_path: Path, model_dir: Path, layouts: dict[tuple[int, int], str]) -> int:
    """Per MatMul whose weight shape (K, N) `layouts` maps to "unpacked" or "transposed" (as timed on the machine
    that builds: timing/kernels.py): `If(the call has one row) then that layout else the MatMul as it was`, in
    place; returns the MatMuls so dispatched (0: `proto` left as it was).

    The one-MatMul alternative to add_batch1_path's whole-body branch, for CPUs where only some shapes gain
    (issue 14's AVX-512 EPYC: the LM head alone). A whole-body branch with only the LM head unpacked ran 1.22x
    the packed graph's time there (ONNX Runtime 1.32 does not pre-pack weights defined two subgraph levels above
    a MatMul, measured: docs/results/speed.md), while this dispatch around the LM head (a hand-built prototype) ran 0.96x. The dispatch goes into the decode
    branch of decode.py's If when the graph has one (one-token calls: the only ones with one row), else into the body."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    body = decode_body(g)
    chosen = [(n, w, bt, layouts.get(b_shape(inits, w, bt), "packed")) for n, w, bt in matmul_weights(body, inits)]
    chosen = [c for c in chosen if c[3] != "packed"]
    if not chosen:
        return 0
    weights = OneRowWeights(inits, data_path, model_dir, ONE_ROW)
    one, size, is_one = f"{ONE_ROW}one", f"{ONE_ROW}size", f"{ONE_ROW}is_one"
    nodes = [  # constants as nodes: the body may be a branch, whose initializers live above it
        helper.make_node("Constant", [], [one], name=one, value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Size", ["input_ids"], [size], name=size),
        helper.make_node("Equal", [size, one], [is_one], name=is_one),
    ]
    targets = {id(n): (w, bt, how) for n, w, bt, how in chosen}
    for n in body.node:
        if id(n) not in targets:
            nodes.append(n)
            continue
        w, bt, how = targets[id(n)]
        y = n.output[0]
        tag = ONE_ROW + (n.name or y)  # an unnamed MatMul is tagged by its output
        want_bt = how == "transposed"
        row = one_row_node(n, weights.get(w, bt, want_bt), want_bt, f"{tag}/row", f"{tag}/row")
        general = copy.deepcopy(n)
        general.output[:] = [f"{tag}/general"]
        out = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]  # noqa: E731
        nodes.append(helper.make_node("If", [is_one], [y], name=tag,
                                      then_branch=helper.make_graph([row], f"{tag}/one_row", [], out(f"{tag}/row")),
                                      else_branch=helper.make_graph([general], f"{tag}/rows", [], out(f"{tag}/general"))))
    del body.node[:]
    body.node.extend(nodes)
    g.initializer.extend(weights.new_inits)
    return len(chosen)


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
