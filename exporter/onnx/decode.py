"""A decode path for the optimized graph: one-token steps rotate q and k inside GroupQueryAttention.

The optimized graph (optimize.py) rotates q and k with two `RotaryEmbedding` nodes per layer at `position_ids`,
after a Split of the packed q/k/v, because GroupQueryAttention's own rotary reads only the first position of
each row for a prompt (measured on ONNX Runtime 1.32: a left-padded prompt batch gets its cached keys rotated
at the wrong positions). For a one-token call (every decode step) the kernel reads each row's own position, so
there the three nodes fold into the attention node, exactly (tests/test_decode_path.py compares both forms,
including onnxruntime-genai's right-padded rows with holes). On SmolLM2 that is 78 of 419 nodes a step: the
per-op profile put the builder's lead at batch 1 on these nodes (docs/results/speed.md). So:

    If(Shape(input_ids)[1] == 1)
      then: the body with each layer's Split + RotaryEmbedding x2 + GroupQueryAttention as one
            GroupQueryAttention(packed q/k/v, do_rotary=1, cos/sin caches, position_ids)
      else: the body as it was (prompts)

Only nodes are duplicated: both branches read the same initializers. The batch-1 branch (gemv.py) only ever
sees one-token calls, so it takes the folded form without a dispatch.
"""

from __future__ import annotations

import copy
import re

import numpy as np
from onnx import helper, numpy_helper

from exporter.onnx.graph import drop_dead_nodes

MS = "com.microsoft"
DECODE = "dec/"  # prefix of the decode branch's value and node names (unique across branches)
PROMPT = "prompt/"  # prefix of the prompt branch's output names (they cannot reuse the If's output names)
DISPATCH = "decode_dispatch"


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _layer(gqa) -> int | None:
    match = re.search(r"present\.(\d+)\.key$", gqa.output[1])
    return int(match.group(1)) if match else None


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
        inputs = qkv + list(gqa.input[3:7]) + [cos, sin, "position_ids"] + rest
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


def add_decode_dispatch(graph, outer: set[str], bias_free: set[int] = frozenset()) -> int:
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
    prompt = []
    for n in graph.node:
        c = copy.deepcopy(n)
        c.input[:] = [PROMPT + x if x in outputs else x for x in n.input]
        c.output[:] = [PROMPT + x if x in outputs else x for x in n.output]
        prompt.append(c)

    def branch_outputs(prefix):
        outs = []
        for o in graph.output:
            v = copy.deepcopy(o)
            v.name = prefix + o.name
            outs.append(v)
        return outs

    then_g = helper.make_graph(decode, "decode_one_token", [], branch_outputs(DECODE))
    else_g = helper.make_graph(prompt, "prompt", [], branch_outputs(PROMPT))
    else_g.value_info.extend(v for v in graph.value_info if v.name not in outputs)
    drop_dead_nodes(then_g)  # what only the bias or the separate rotary read (the body was sorted: order kept)
    one, idx = f"{DISPATCH}/one", f"{DISPATCH}/seq_axis"
    del graph.value_info[:]
    del graph.node[:]
    graph.node.extend([  # constants as nodes: the graph may be a branch, whose initializers live above it
        helper.make_node("Constant", [], [one], name=one, value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], [idx], name=idx, value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], [f"{DISPATCH}/one_scalar"], name=f"{DISPATCH}/one_scalar",
                         value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Shape", ["input_ids"], [f"{DISPATCH}/shape"], name=f"{DISPATCH}/shape"),
        helper.make_node("Gather", [f"{DISPATCH}/shape", idx], [f"{DISPATCH}/tokens"], name=f"{DISPATCH}/tokens",
                         axis=0),
        helper.make_node("Equal", [f"{DISPATCH}/tokens", one], [f"{DISPATCH}/one_token_1d"],
                         name=f"{DISPATCH}/one_token_1d"),
        helper.make_node("ReduceMin", ["attention_mask"], [f"{DISPATCH}/mask_min"], name=f"{DISPATCH}/mask_min",
                         keepdims=0),
        helper.make_node("Equal", [f"{DISPATCH}/mask_min", f"{DISPATCH}/one_scalar"], [f"{DISPATCH}/unpadded"],
                         name=f"{DISPATCH}/unpadded"),
        helper.make_node("Squeeze", [f"{DISPATCH}/one_token_1d"], [f"{DISPATCH}/one_token"],
                         name=f"{DISPATCH}/one_token"),
        helper.make_node("And", [f"{DISPATCH}/one_token", f"{DISPATCH}/unpadded"], [f"{DISPATCH}/take_decode"],
                         name=f"{DISPATCH}/take_decode"),
        helper.make_node("If", [f"{DISPATCH}/take_decode"], [o.name for o in graph.output], name=DISPATCH,
                         then_branch=then_g, else_branch=else_g),
    ])
    return folded
