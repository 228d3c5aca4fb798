"""Graph utilities shared by the rewrites (optimize.py, gemv.py) and the readers (bench, export checks).

Imported only where a graph is read or rewritten: it imports onnx at the top.
"""

from __future__ import annotations

import collections
import copy
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from exporter.errors import UserError


class Graph:
    """Producer/consumer indexes over an onnx GraphProto, and constant lookup."""

    def __init__(self, graph):
        self.graph = graph
        self.reindex()

    def reindex(self):
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers[i].append(node)
        self.inits = {t.name: t for t in self.graph.initializer}

    def const(self, name):
        """numpy value of an initializer or Constant output, else None."""
        if name in self.inits:
            t = self.inits[name]
            if t.data_location == 1:  # external: a weight, never a small constant
                return None
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def only_consumer(self, name, op_type=None):
        users = self.consumers.get(name, [])
        if len(users) != 1 or (op_type and users[0].op_type != op_type):
            return None
        return users[0]


def _initializers_everywhere(graph):
    """The initializers of `graph` and of every subgraph (the batch-1 dispatch's branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _initializers_everywhere(sub)


def external_data_files(path: Path) -> list[Path]:
    """The external data files a graph's initializers (its subgraphs' too) read, beside it: an optimized graph reads
    most of its weights from the plain graph's file, its own holds only what the rewrite made new."""
    proto = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in _initializers_everywhere(proto.graph) if t.data_location == TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [Path(path).parent / name for name in sorted(names)]


def move_graph(src: Path, dst: Path) -> None:
    """Rename a graph and its own external data file (`src.data` -> `dst.data`), pointing its tensors at the new
    name; tensors it reads from another graph's file (the plain graph's weights) are left as they are."""
    from exporter.onnx.contract import data_path

    proto = onnx.load(str(src), load_external_data=False)
    old, new = data_path(src).name, data_path(dst).name
    for tensor in _initializers_everywhere(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    if data_path(src).exists():
        data_path(src).replace(data_path(dst))
    else:
        data_path(dst).unlink(missing_ok=True)
    onnx.save(proto, str(dst))
    src.unlink()


def initializer_array(tensor, folder: Path):
    """An initializer's values, reading external data from `folder` (the proto is left as it was).

    onnx refuses external data behind a symbolic link or a file with several hard links (its
    "hardlink attack" check); that is said as one line with the remedy, not as onnx's traceback.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    copy = TensorProto()
    copy.CopyFrom(tensor)
    if copy.data_location == TensorProto.EXTERNAL:
        try:
            load_external_data_for_tensor(copy, str(folder))
        except onnx.checker.ValidationError as exc:
            if "link" not in str(exc):
                raise
            location = next(e.value for e in copy.external_data if e.key == "location")
            raise UserError(f"{Path(folder) / location}: onnx reads external data only from a plain file (this "
                            "one is a symbolic link or has several hard links); replace it with a copy "
                            "(cp --remove-destination) or delete its folder to have it made again") from None
    return numpy_helper.to_array(copy)


def external_initializer(value, name: str, location: str, offset: int):
    """A TensorProto for `value` (numpy) whose bytes sit at `offset` in the data file `location`."""
    t = numpy_helper.from_array(value.reshape(-1)[:0], name)
    t.ClearField("raw_data")
    t.dims[:] = value.shape
    t.data_location = TensorProto.EXTERNAL
    for key, val in (("location", location), ("offset", str(offset)), ("length", str(value.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, val
    return t


def general_branch(graph, prefix: str):
    """A dispatch's general branch of `graph`'s body: its nodes copied as they are, except that the body's
    outputs are renamed `prefix + name` (a branch cannot reuse the If's output names); (nodes, outputs)."""
    outputs = {o.name for o in graph.output}
    nodes = []
    for n in graph.node:
        c = copy.deepcopy(n)
        c.input[:] = [prefix + x if x in outputs else x for x in n.input]
        c.output[:] = [prefix + x if x in outputs else x for x in n.output]
        nodes.append(c)
    return nodes, branch_outputs(graph, prefix)


def branch_outputs(graph, prefix: str) -> list:
    """`graph`'s output value infos renamed `prefix + name`: what an If branch standing for it outputs."""
    outs = []
    for o in graph.output:
        v = copy.deepcopy(o)
        v.name = prefix + o.name
        outs.append(v)
    return outs


def drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def drop_dead_nodes(graph) -> int:
    """Remove nodes none of whose outputs are used (to a fixpoint)."""
    outputs = {o.name for o in graph.output}
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


def topological_sort(graph) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or a dangling input")
        done = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if id(n) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


DISPATCHES = ("batch1_dispatch", "decode_dispatch")  # gemv.py's and decode.py's If nodes (the latter prefixed)


def body_of(graph):
    """The body a reader should look at for the model's structure: through each dispatch (gemv.py's batch-1
    If, decode.py's decode If) to its general branch, the one prompts run; else the graph itself."""
    while len(graph.node) and graph.node[-1].op_type == "If" and graph.node[-1].name.endswith(DISPATCHES):
        graph = next(a.g for a in graph.node[-1].attribute if a.name == "else_branch")
    return graph


def body_graph(proto):
    """body_of the model's top-level graph."""
    return body_of(proto.graph)


def onnx_weight_elements(path: Path) -> int:
    """Elements in the graph's floating-point initializers (weights; a few small constants too)."""
    proto = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for init in proto.graph.initializer:
        if init.data_type in floats:
            n = 1
            for d in init.dims:
                n *= d
            total += n
    return total


def op_counts(path: Path) -> dict[str, int]:
    """{op type: nodes} of a graph (domain-qualified for contrib ops): what a peer's graph has that ours lacks."""
    proto = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                 for n in body_graph(proto).node)  # our optimized graph: its general branch
    return dict(counts.most_common())
