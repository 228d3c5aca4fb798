"""A decode path for the optimized graph: one-token steps rotate q and k inside GroupQueryAttention.

The optimized graph (optimize.py) rotates q and k with two `RotaryEmbedding` nodes per layer at `position_ids`,
after a Split of the packed q/k/v, and masks with an additive bias, because GroupQueryAttention's own rotary
reads only the first position of each row for a prompt (measured on ONNX Runtime 1.32: a left-padded prompt
batch gets its cached keys rotated at the wrong positions). For a one-token call without padding the kernel
rotates each row at its cache length, which is the row's position whenever position_ids says so (the usual case:
every row at attention_mask's width - 1), so there the three nodes fold into the attention node, exactly; and
with no padding anywhere in the mask, a one-token call attends to every cached position, so the bias is all zeros
and is dropped too (not for a layer with a sliding window, whose bias carries the window). On SmolLM2 that takes
a decode step from 419 nodes to 325 (the builder's full graph: 342), bit-identical outputs
(tests/test_optimize.py). The folded attention gets no position_ids input, as the builder's graph: with it,
ONNX Runtime 1.32 ran SmolLM2's batch-4 decode steps at context 512 with 2 threads 1.2x slower (0.833x without,
`scripts/peers/ab.py`, 8 sets; no difference at batch 1 or with 1 thread). So:

    If(Shape(input_ids)[1] == 1 and ReduceMin(attention_mask) == 1
       and every position_ids == Shape(attention_mask)[1] - 1)
      then: the body with each layer's Split + RotaryEmbedding x2 + GroupQueryAttention(bias) as one
            GroupQueryAttention(packed q/k/v, do_rotary=1, cos/sin caches[, bias])
      else: the body as it was (prompts; padded batches, e.g. onnxruntime-genai's right-padded rows with holes;
            rows at positions of the caller's own choosing)

Only nodes are duplicated: both branches read the same initializers. With the batch-1 dispatch (gemv.py), each of
its branches gets this dispatch inside it. Heads whose size is not a multiple of 16 are left as they are
(GroupQueryAttention's rotary refuses them).
"""

from __future__ import annotations

import copy

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.architectures import head_dim, sliding_window_for
from exporter.onnx.contract import kept_layers, present_key_layer
from exporter.onnx.graph import branch_outputs, drop_dead_nodes, general_branch

MS = "com.microsoft"
DECODE = "dec/"  # prefix of the decode branch's value and node names (unique across branches)
PROMPT = "prompt/"  # prefix of the prompt branch's output names (they cannot reuse the If's output names)
DISPATCH = "decode_dispatch"


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _layer(gqa) -> int | None:
    return present_key_layer(gqa.output[1])


def fold_rotary(nodes: list, bias_free: set[int] = frozenset()) -> tuple[list, int]:
    """`nodes` (a body in execution order) with each attention's RotaryEmbedding pair (and the Split of a packed
    q/k/v feeding it) folded into its GroupQueryAttention; (new node list, attentions folded). Valid for
    one-token calls only (module docstring). Nodes are copies; the input list is not changed."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, replace = set(), {}

    def only_user(name, node):
        return [id(c) for c in consumers.get(name, [])] == [id(node)]

    for gqa in nodes:
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS or _attr(gqa, "do_rotary", 0):
            continue
        rq, rk = producer.get(gqa.input[0]), producer.get(gqa.input[1])
        if rq is None or rk is None or any(r.op_type != "RotaryEmbedding" or r.domain != MS for r in (rq, rk)):
            continue  # a layer without rotary embedding (SmolLM3's no-rope layers)
        if (rq.input[1] != "position_ids" or list(rq.input[1:4]) != list(rk.input[1:4])
                or _attr(rq, "interleaved", 0) or _attr(rk, "interleaved", 0)
                or not only_user(rq.output[0], gqa) or not only_user(rk.output[0], gqa)):
            continue
        q, k, v = rq.input[0], rk.input[0], gqa.input[2]
        split = producer.get(q)
        packed = (split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]
                  and _attr(split, "axis", 0) in (-1, 2) and only_user(q, rq) and only_user(k, rk)
                  and only_user(v, gqa))
        qkv = [split.input[0], "", ""] if packed else [q, k, v]
        cos, sin = rq.input[2], rq.input[3]
        rest = list(gqa.input[10:])
        if _layer(gqa) in bias_free and rest:  # no padding and no window: the bias is all zeros for one token
            rest[0] = ""
        # no position_ids: the kernel rotates each row at its own cache length, which the dispatch checked equals
        # position_ids (module docstring); with them ORT 1.32 ran batch-4 steps 1.2x slower at 2 threads
        inputs = qkv + list(gqa.input[3:7]) + [cos, sin, ""] + rest
        while inputs[-1] == "":
            inputs.pop()
        new = copy.deepcopy(gqa)
        new.input[:] = inputs
        for a in list(new.attribute):
            if a.name in ("do_rotary", "rotary_interleaved"):
                new.attribute.remove(a)
        new.attribute.extend([helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)])
        replace[id(gqa)] = new
        drop.update({id(rq), id(rk)} | ({id(split)} if packed else set()))
    folded = [replace.get(id(n), copy.deepcopy(n)) for n in nodes if id(n) not in drop]
    return folded, len(replace)


def decode_layers(config, kept: list[int]) -> set[int] | None:
    """The kept layers whose decode-step bias may be dropped (no sliding window: with no padding, a one-token
    call attends to every cached position), or None where the fold cannot run at all: ONNX Runtime's
    GroupQueryAttention rotates only heads whose size is a multiple of 16."""
    if head_dim(config) % 16:
        return None
    return {i for i in kept if sliding_window_for(config, i) is None}


def decode_body(graph):
    """The body one-token calls run: the decode branch of this module's If where `graph` has one, else `graph`."""
    if len(graph.node) and graph.node[-1].op_type == "If" and graph.node[-1].name == DISPATCH:
        return next(a.g for a in graph.node[-1].attribute if a.name == "then_branch")
    return graph


def add_decode_path(proto, config, kept: list[int]) -> int:
    """Give `proto` (the optimized graph, with or without the batch-1 dispatch of gemv.py) its decode path;
    returns the attentions folded per body (0: none, `proto` left as it was)."""
    bias_free = decode_layers(config, kept)
    if bias_free is None:
        return 0
    top = proto.graph
    dispatch = top.node[-1] if len(top.node) else None
    if dispatch is None or dispatch.op_type != "If" or dispatch.name != "batch1_dispatch":
        return add_decode_dispatch(top, set(), bias_free)
    outer = {i.name for i in top.input} | {t.name for t in top.initializer} | {o for n in top.node for o in n.output}
    folded = 0
    for attr in dispatch.attribute:  # each branch gets its own dispatch (names kept apart by prefix)
        folded = add_decode_dispatch(attr.g, outer, bias_free, prefix=f"{attr.name}/")
    return folded


def add_decode_path_to(path: Path, config) -> int:
    """add_decode_path on a saved graph file (its external data untouched: only nodes change)."""
    proto = onnx.load(str(path), load_external_data=False)
    folded = add_decode_path(proto, config, kept_layers({i.name: i for i in proto.graph.input}))
    if folded:
        onnx.save(proto, str(path))
    return folded


def add_decode_dispatch(graph, outer: set[str], bias_free: set[int] = frozenset(), prefix: str = "") -> int:
    """Rewrite `graph` (the top-level graph, or a branch of the batch-1 dispatch) into the If above; returns the
    attentions folded in the decode branch (0: nothing to fold, `graph` left as it was). `outer` holds the names
    visible from outside the body (graph inputs, initializers, outer-scope values): they keep their names."""
    decode, folded = fold_rotary(list(graph.node), bias_free)
    if not folded:
        return 0
    outputs = {o.name for o in graph.output}
    visible = outer | {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}

    def decode_name(x):
        return x if x in visible else DECODE + x

    for n in decode:
        n.name = DECODE + (n.name or n.op_type)
        n.input[:] = [decode_name(x) for x in n.input]
        n.output[:] = [DECODE + x if x else x for x in n.output]
    prompt, prompt_outputs = general_branch(graph, PROMPT)
    then_g = helper.make_graph(decode, "decode_one_token", [], branch_outputs(graph, DECODE))
    else_g = helper.make_graph(prompt, "prompt", [], prompt_outputs)
    else_g.value_info.extend(v for v in graph.value_info if v.name not in outputs)
    drop_dead_nodes(then_g)  # what only the bias or the separate rotary read (the body was sorted: order kept)
    d = prefix + DISPATCH  # this dispatch's value names (sibling branches may each hold one)
    one, idx = f"{d}/one", f"{d}/seq_axis"
    del graph.value_info[:]
    del graph.node[:]
    graph.node.extend([  # constants as nodes: the graph may be a branch, whose initializers live above it
        helper.make_node("Constant", [], [one], name=one, value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], [idx], name=idx, value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], [f"{d}/one_scalar"], name=f"{d}/one_scalar",
                         value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Shape", ["input_ids"], [f"{d}/shape"], name=f"{d}/shape"),
        helper.make_node("Gather", [f"{d}/shape", idx], [f"{d}/tokens"], name=f"{d}/tokens",
                         axis=0),
        helper.make_node("Equal", [f"{d}/tokens", one], [f"{d}/one_token_1d"],
                         name=f"{d}/one_token_1d"),
        helper.make_node("ReduceMin", ["attention_mask"], [f"{d}/mask_min"], name=f"{d}/mask_min",
                         keepdims=0),
        helper.make_node("Equal", [f"{d}/mask_min", f"{d}/one_scalar"], [f"{d}/unpadded"],
                         name=f"{d}/unpadded"),
        helper.make_node("Squeeze", [f"{d}/one_token_1d"], [f"{d}/one_token"],
                         name=f"{d}/one_token"),
        # every row's position is the cache length (attention_mask's width - 1): what the kernel rotates at
        helper.make_node("Shape", ["attention_mask"], [f"{d}/mask_shape"], name=f"{d}/mask_shape"),
        helper.make_node("Gather", [f"{d}/mask_shape", f"{d}/one_scalar"], [f"{d}/mask_len"], name=f"{d}/mask_len",
                         axis=0),
        helper.make_node("Sub", [f"{d}/mask_len", f"{d}/one_scalar"], [f"{d}/last"], name=f"{d}/last"),
        helper.make_node("Equal", ["position_ids", f"{d}/last"], [f"{d}/at_last"], name=f"{d}/at_last"),
        helper.make_node("Cast", [f"{d}/at_last"], [f"{d}/at_last_int"], name=f"{d}/at_last_int",
                         to=onnx.TensorProto.INT64),
        helper.make_node("ReduceMin", [f"{d}/at_last_int"], [f"{d}/all_at_last"], name=f"{d}/all_at_last",
                         keepdims=0),
        helper.make_node("Equal", [f"{d}/all_at_last", f"{d}/one_scalar"], [f"{d}/positioned"],
                         name=f"{d}/positioned"),
        helper.make_node("And", [f"{d}/one_token", f"{d}/unpadded"], [f"{d}/one_unpadded"],
                         name=f"{d}/one_unpadded"),
        helper.make_node("And", [f"{d}/one_unpadded", f"{d}/positioned"], [f"{d}/take_decode"],
                         name=f"{d}/take_decode"),
        helper.make_node("If", [f"{d}/take_decode"], [o.name for o in graph.output], name=d,
                         then_branch=then_g, else_branch=else_g),
    ])
    return folded
