"""optimize_onnx(plain.onnx, config) -> model.opt.onnx: the same model, rewritten so ONNX Runtime decodes faster.

The plain graph (export_onnx) spells attention out op by op (rotary, repeat_interleave for GQA, scores,
additive mask, softmax) and RMSNorm as Pow/ReduceMean/Sqrt/Reciprocal/Mul. ONNX Runtime's own graph
optimizer fuses none of that, so this module rewrites it, keeping the I/O contract (names, dtypes, dims):

- each kept attention layer becomes `com.microsoft.RotaryEmbedding` of q and k at `position_ids` (cos/sin
  caches computed from the config) and one `com.microsoft.GroupQueryAttention` node that reads grouped KV
  heads without copies, takes our additive bias as `attention_bias` (so padding, left or right, and
  sliding windows mean what they mean in the plain graph) and produces the contract's present outputs (past and present
  in separate buffers, as the contract has them);
- where q, k and v are three MatMuls of the same input (+ constant biases: Qwen2), they become one MatMul
  (+ one Add) on the concatenated weight, then one Split;
- each RMSNorm becomes `SimplifiedLayerNormalization`, and a residual add feeding a norm becomes
  `com.microsoft.SkipSimplifiedLayerNormalization` (the add and the norm in one pass).

That is close to onnxruntime-genai's builder graph (which rotates inside the attention node, at cache
slots), with our bias for padding and rotary at `position_ids`. One-token calls without padding (decode steps)
get a body of their own where each attention's Split + RotaryEmbedding pair folds into GroupQueryAttention and
the bias is dropped where no window needs it (exporter/onnx/decode.py: exact there, not for padded prompts).
Then, for fp32 graphs, the body is wrapped
in an If that sends one-row calls (batch-1 decode) to a copy whose MatMuls read unpacked weights, where
ONNX Runtime's one-row kernels run (exporter/gemv.py says why and what it costs in memory). Measured and not
done: packing the MLP's gate/up MatMuls (one MatMul + Split) left MatMul time unchanged on SmolLM2 and
added the Split's time (docs/results/speed.md).

The families' twists (exporter/architectures.py) map onto the same ops: fused q/k/v projections and q/k norms
(per head or over all heads) feed the three-input form; Gemma 2's attention soft-capping is GroupQueryAttention's
`softcap` (applied to the scaled scores before the bias, as Gemma does); each rotary kind gets its own cos/sin
caches (Gemma 3's local and global bases) and a layer without rotary embedding (SmolLM3) gets no
RotaryEmbedding node; multipliers and logit scaling stay the plain graph's own nodes. Refused, with the reason
(the pipeline reports it under not_run and keeps the plain graph): RoPE types that depend on the sequence length
(Phi-3's longrope, dynamic), partial rotary embeddings (some Phi-3 sizes), and any attention the pattern
match does not recognise.

Only ONNX Runtime runs the result (the contrib ops are its own): TensorRT gets the plain graph.
The optimized graph is saved beside the plain one and reads its weights from the plain graph's external
data file; only the concatenated q/k/v weights and the batch-1 branch's transposed copies are new, in
`model.opt.onnx.data` (the cos/sin caches are stored inline). Parity is checked on it exactly as on the
plain graph. Graphs whose pattern is not recognised are refused with a reason, never half-rewritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.architectures import head_dim as head_dim_of, rope_kind_for
from exporter.dtypes import numpy_dtype, onnx_dtype_name
from exporter.onnx.contract import OPT_FILE, data_path as data_path_of, input_names, kept_layers, present_name
from exporter.onnx.decode import add_decode_path
from exporter.onnx.gemv import add_batch1_path, add_one_row_dispatch
from exporter.onnx.graph import (Graph, drop_dead_nodes, drop_unused_initializers, external_initializer,
                                 initializer_array, topological_sort)
MS = "com.microsoft"


class NotOptimizable(Exception):
    """The graph (or its precision, or its RoPE type) is outside what this rewrite handles; the reason says why."""


def _nearest(g: Graph, name: str, op_type: str, depth: int, upstream: bool):
    """Nearest node of `op_type` above (producers) or below (consumers) tensor `name`, breadth first,
    at most `depth` hops."""
    frontier, seen = [name], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            nodes = [g.producer[t]] if upstream and t in g.producer else [] if upstream else g.consumers.get(t, [])
            for node in nodes:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == op_type:
                    return node
                nxt += list(node.input if upstream else node.output)
        frontier = nxt
    return None


def _upstream(g: Graph, name: str, op_type: str, depth: int = 6):
    return _nearest(g, name, op_type, depth, upstream=True)


def _downstream(g: Graph, name: str, op_type: str, depth: int = 8):
    return _nearest(g, name, op_type, depth, upstream=False)


def _rope_type(config, kind: str) -> str:
    rope = (getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    if isinstance(rope, dict) and isinstance(rope.get(kind), dict):  # per layer type (Gemma 3)
        rope = rope[kind]
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"


def _rotary_module(config):
    """The family's own rotary embedding module (e.g. Gemma3RotaryEmbedding), built from the config."""
    import importlib

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]  # e.g. Gemma3ForCausalLM
    module = importlib.import_module(getattr(transformers, causal_lm).__module__)
    return getattr(module, causal_lm.removesuffix("ForCausalLM") + "RotaryEmbedding")(config)


def rotary_caches(config, max_positions: int, kind: str = "default"):
    """cos/sin caches [max_positions, rotary_dim / 2] exactly as the model's rotary embedding computes them,
    for one rotary kind (architectures.rope_kind_for: "default", or a layer type with its own base)."""
    import torch

    rope_type = _rope_type(config, kind)
    if rope_type not in ("default", "llama3", "linear"):  # dynamic / longrope change with the length
        raise NotOptimizable(f"RoPE type {rope_type!r} depends on the sequence length; the plain graph is kept")
    rotary = _rotary_module(config)
    positions = torch.arange(max_positions)[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():  # [1, P, D_rot], halves repeated
        cos, sin = rotary(x, positions) if kind == "default" else rotary(x, positions, kind)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _match_softcap(g: Graph, scores: str) -> tuple[float, str]:
    """`cap * tanh(scores / cap)` after the scaled scores (Gemma 2): (cap, its output), else (0.0, scores).
    GroupQueryAttention's `softcap` applies it to the scaled scores before the attention bias, as Gemma 2 does."""
    tanh = g.only_consumer(scores, "Tanh")
    if tanh is not None:  # a cap of 1.0: the exporter folds the division and the product away
        return 1.0, tanh.output[0]
    div = g.only_consumer(scores, "Div")
    tanh = g.only_consumer(div.output[0], "Tanh") if div is not None else None
    mul = g.only_consumer(tanh.output[0], "Mul") if tanh is not None else None
    if mul is None:
        return 0.0, scores
    cap, cap_again = g.const(div.input[1]), g.const(next(i for i in mul.input if i != tanh.output[0]))
    if cap is None or cap_again is None or cap.size != 1 or float(cap.reshape(())) != float(cap_again.reshape(())):
        return 0.0, scores
    return float(cap.reshape(())), mul.output[0]


def _find_attention(g: Graph, layer: int):
    """The tensors around layer `layer`'s attention in the plain graph (see surgery.SkippedLayer.attend)."""
    cat_k = g.producer.get(present_name(layer, "key"))
    cat_v = g.producer.get(present_name(layer, "value"))
    if cat_k is None or cat_v is None or cat_k.op_type != "Concat" or cat_v.op_type != "Concat":
        raise NotOptimizable(f"layer {layer}: present key/value are not produced by Concat")
    past_k, k_rot = cat_k.input
    past_v, v_t = cat_v.input
    v_transpose = g.producer.get(v_t)
    k_transpose = _upstream(g, k_rot, "Transpose")
    scores = _downstream(g, present_name(layer, "key"), "MatMul", depth=8)
    if v_transpose is None or v_transpose.op_type != "Transpose" or k_transpose is None or scores is None:
        raise NotOptimizable(f"layer {layer}: attention pattern not recognised (k/v transpose or scores)")
    q_transpose = _upstream(g, scores.input[0], "Transpose")
    scale_mul = g.only_consumer(scores.output[0], "Mul")
    if q_transpose is None or scale_mul is None:
        raise NotOptimizable(f"layer {layer}: attention pattern not recognised (q or scale)")
    scale = g.const(scale_mul.input[1])
    softcap, capped = _match_softcap(g, scale_mul.output[0])
    bias_add = g.only_consumer(capped, "Add")
    if scale is None or scale.size != 1 or bias_add is None:
        raise NotOptimizable(f"layer {layer}: attention scale/bias not recognised")
    softmax = _downstream(g, bias_add.output[0], "Softmax", depth=2)
    probs_matmul = _downstream(g, softmax.output[0], "MatMul", depth=3) if softmax else None
    out_transpose = g.only_consumer(probs_matmul.output[0], "Transpose") if probs_matmul else None
    out_reshape = g.only_consumer(out_transpose.output[0], "Reshape") if out_transpose else None
    if out_reshape is None:
        raise NotOptimizable(f"layer {layer}: attention output pattern not recognised")
    return {
        "q": q_transpose.input[0], "k": k_transpose.input[0], "v": v_transpose.input[0],  # [B, T, H, D]
        "past_k": past_k, "past_v": past_v, "scale": float(scale.reshape(())), "softcap": softcap,
        "bias": bias_add.input[1], "out": out_reshape.output[0], "remove": [cat_k, cat_v, out_reshape],
    }


def _add_gqa(g: Graph, proto, layer: int, found: dict, heads: int, kv_heads: int, shared: dict, rope: str | None):
    """Layer `layer`'s attention as ORT contrib ops: q/k/v (one packed MatMul + Split where packable),
    `RotaryEmbedding` of q and k at `position_ids` (none where `rope` is None), and one GroupQueryAttention node
    for cache append and attention (with the layer's soft-cap, if any).

    Rotary reads `position_ids` as the plain graph does, so any padding the mask describes means the same
    in both graphs: left padding (our runners), right padding with holes in the mask (onnxruntime-genai
    batches), and the caches are interchangeable. GroupQueryAttention's own rotary is not used: it rotates
    at cache-slot indices, which equal the positions only without padding (a first version did that and
    gave onnxruntime-genai's right-padded rows wrong tokens). Padding is masked by our additive bias
    (`attention_bias`), which also carries sliding windows.
    """

    nodes = []
    q_raw, k_raw, v = (f"gqa{layer}_{key}" for key in ("q_raw", "k_raw", "v"))
    if "qkv" in found:  # one MatMul (+ bias) for q, k and v, split for the rotary
        qkv = found["qkv"]
        packed = f"gqa{layer}_qkv"
        out = packed if qkv.get("bias") is None else f"gqa{layer}_qkv_nobias"
        nodes.append(helper.make_node("MatMul", [qkv["input"], qkv["weight"]], [out], name=f"gqa{layer}_qkv_proj"))
        if qkv.get("bias") is not None:
            nodes.append(helper.make_node("Add", [out, qkv["bias"]], [packed], name=f"gqa{layer}_qkv_bias"))
        nodes.append(helper.make_node("Split", [packed, shared["qkv_split"]], [q_raw, k_raw, v],
                                      name=f"gqa{layer}_split", axis=-1))
    else:  # q/k norms (qwen3) sit between the projections and attention: three inputs, [B, T, H*D] each
        for key, name in (("q", q_raw), ("k", k_raw), ("v", v)):  # [B, T, H, D] -> [B, T, H*D]
            nodes.append(helper.make_node("Reshape", [found[key], shared["pack_shape"]], [name],
                                          name=f"gqa{layer}_pack_{key}"))
    q, k = q_raw, k_raw  # a layer without rotary embedding (SmolLM3's no-rope layers) attends with them as they are
    if rope is not None:  # its rotary kind's caches (Gemma 3: local and global layers have their own)
        q, k = f"gqa{layer}_q", f"gqa{layer}_k"
        cos, sin = shared["rope"][rope]
        for raw, rotated in ((q_raw, q), (k_raw, k)):
            nodes.append(helper.make_node("RotaryEmbedding", [raw, "position_ids", cos, sin], [rotated],
                                          name=f"gqa{layer}_rotary_{rotated[-1]}", domain=MS, interleaved=0))
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        [q, k, v, found["past_k"], found["past_v"], shared["seqlens_k"], shared["total_len"],
         "", "", "", found["bias"]],
        [found["out"], present_name(layer, "key"), present_name(layer, "value")],
        name=f"GroupQueryAttention_{layer}", domain=MS, num_heads=heads, kv_num_heads=kv_heads,
        do_rotary=0, scale=found["scale"], softcap=found["softcap"], local_window_size=-1))
    return nodes


def _plan_qkv_packing(g: Graph, found: dict) -> dict | None:
    """q/k/v as three MatMuls of one input (each + an optional constant bias, Qwen2), each reshaped straight
    to [B, T, H, D]: packable into one MatMul (+ one Add). q/k norms (Qwen3) in between: not packable."""
    matmuls, biases = [], []
    for key in ("q", "k", "v"):
        reshape = g.producer.get(found[key])
        node = g.producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        bias = None
        if node is not None and node.op_type == "Add":
            inits = [i for i in node.input if i in g.inits]
            if len(inits) != 1 or len(g.inits[inits[0]].dims) != 1:
                return None
            bias = inits[0]
            node = g.producer.get(next(i for i in node.input if i != bias))
        if node is None or node.op_type != "MatMul" or node.input[1] not in g.inits:
            return None
        matmuls.append(node)
        biases.append(bias)
    if len({mm.input[0] for mm in matmuls}) != 1 or len({b is None for b in biases}) != 1:
        return None
    return {"input": matmuls[0].input[0], "weights": [mm.input[1] for mm in matmuls],
            "biases": biases if biases[0] is not None else None}


def _write_packed_weights(proto, plans: dict, plain_dir: Path, data_path: Path) -> None:
    """Concatenate each layer's q/k/v weights ([C, out] each) into one initializer in `data_path` (biases,
    when there are any, into one small inline initializer); sets plan["weight"] and plan["bias"]."""

    inits = {t.name: t for t in proto.graph.initializer}

    def value(name):
        return initializer_array(inits[name], plain_dir)

    offset = 0
    with open(data_path, "wb") as fh:
        for layer, plan in plans.items():
            packed = np.ascontiguousarray(np.concatenate([value(n) for n in plan["weights"]], axis=1))
            blob = packed.tobytes()
            fh.write(blob)
            t = external_initializer(packed, f"opt.layers.{layer}.qkv_proj.weight", data_path.name, offset)
            proto.graph.initializer.append(t)
            offset += len(blob)
            plan["weight"], plan["bias"] = t.name, None
            if plan["biases"]:
                bias = np.concatenate([value(n) for n in plan["biases"]])
                plan["bias"] = f"opt.layers.{layer}.qkv_proj.bias"
                proto.graph.initializer.append(numpy_helper.from_array(bias, plan["bias"]))


def _shared_inputs(proto, caches: dict, np_dtype, qkv_split: tuple[int, int, int]):
    """seqlens_k (= total - 1 for every row: the bias does the padding), total length, rotary caches (one
    cos/sin pair per rotary kind), and the sizes a packed q/k/v output splits into."""

    consts = {
        "opt_pack_shape": np.array([0, 0, -1], dtype=np.int64),
        "opt_one_i32": np.array(1, dtype=np.int32),
        "opt_idx1": np.array([1], dtype=np.int64),
        "opt_idx0": np.array([0], dtype=np.int64),
        "opt_qkv_split": np.array(qkv_split, dtype=np.int64),
    }
    rope = {}
    for n, (kind, (cos, sin)) in enumerate(sorted(caches.items())):
        suffix = "" if kind == "default" else f"_{n}"  # the single-kind graph keeps its names
        consts[f"opt_cos_cache{suffix}"], consts[f"opt_sin_cache{suffix}"] = cos.astype(np_dtype), sin.astype(np_dtype)
        rope[kind] = (f"opt_cos_cache{suffix}", f"opt_sin_cache{suffix}")
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["opt_mask_shape"], name="opt_mask_shape"),
        helper.make_node("Gather", ["opt_mask_shape", "opt_idx1"], ["opt_total_1d"], name="opt_total_1d", axis=0),
        helper.make_node("Gather", ["opt_mask_shape", "opt_idx0"], ["opt_batch_1d"], name="opt_batch_1d", axis=0),
        helper.make_node("Cast", ["opt_total_1d"], ["opt_total_1d_i32"], name="opt_total_cast", to=TensorProto.INT32),
        helper.make_node("Squeeze", ["opt_total_1d_i32"], ["opt_total_len"], name="opt_total_len"),
        helper.make_node("Sub", ["opt_total_1d_i32", "opt_one_i32"], ["opt_last"], name="opt_last"),
        helper.make_node("Expand", ["opt_last", "opt_batch_1d"], ["opt_seqlens_k"], name="opt_seqlens_k"),
    ]
    shared = {"pack_shape": "opt_pack_shape", "seqlens_k": "opt_seqlens_k", "total_len": "opt_total_len",
              "rope": rope, "qkv_split": "opt_qkv_split"}
    return nodes, shared


def _match_rmsnorm(g: Graph, mul_weight):
    """`weight * (x * 1/sqrt(mean(x^2) + eps))` ending at `mul_weight`: (x, weight, eps, nodes) or None."""
    inputs = list(mul_weight.input)
    for w_idx in (0, 1):
        scaled = g.producer.get(inputs[1 - w_idx])
        if scaled is None or scaled.op_type != "Mul" or inputs[w_idx] not in g.inits:
            continue
        for x_idx in (0, 1):
            x, r = scaled.input[x_idx], scaled.input[1 - x_idx]
            recip = g.producer.get(r)
            sqrt = g.producer.get(recip.input[0]) if recip is not None and recip.op_type == "Reciprocal" else None
            add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
            if add is None or add.op_type != "Add":
                continue
            mean = g.producer.get(add.input[0])
            eps = g.const(add.input[1])
            pow_ = g.producer.get(mean.input[0]) if mean is not None and mean.op_type == "ReduceMean" else None
            if pow_ is None or pow_.op_type != "Pow" or pow_.input[0] != x or eps is None:
                continue
            exponent = g.const(pow_.input[1])
            axes = g.const(mean.input[1]) if len(mean.input) > 1 else None
            if exponent is None or float(exponent.reshape(())) != 2.0 or axes is None or list(axes.reshape(-1)) != [-1]:
                continue
            return x, inputs[w_idx], float(eps.reshape(())), [pow_, mean, add, sqrt, recip, scaled, mul_weight]
    return None


def _fuse_norms(g: Graph) -> tuple[int, int]:
    """RMSNorm -> SimplifiedLayerNormalization; residual Add feeding it -> SkipSimplifiedLayerNormalization."""

    norms = skips = 0
    for node in list(g.graph.node):
        if node.op_type != "Mul":
            continue
        match = _match_rmsnorm(g, node)
        if match is None:
            continue
        x, weight, eps, old = match
        # intermediate results used elsewhere would lose their producer: leave such a norm alone
        internal = {o for n in old[:-1] for o in n.output}
        if any(c not in old for t in internal for c in g.consumers.get(t, [])):
            continue
        for n in old:
            g.graph.node.remove(n)
        add = g.producer.get(x)
        residual = (add is not None and add.op_type == "Add" and x not in {o.name for o in g.graph.output}
                    and all(g.producer.get(i) is not None or i in {v.name for v in g.graph.input} for i in add.input)
                    and g.const(add.input[0]) is None and g.const(add.input[1]) is None)
        if residual:
            # the Add's output (the residual stream) is still needed downstream: output 3 of the fused op
            g.graph.node.remove(add)
            new = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], weight],
                                   [node.output[0], "", "", x], name=f"SkipSimplifiedLayerNorm_{skips}",
                                   domain=MS, epsilon=eps)
            skips += 1
        else:
            new = helper.make_node("SimplifiedLayerNormalization", [x, weight], [node.output[0]],
                                   name=f"SimplifiedLayerNorm_{norms}", axis=-1, epsilon=eps, stash_type=1)
            norms += 1
        g.graph.node.append(new)
        g.reindex()
    return norms, skips


def optimize_onnx(plain_path: Path, config, out_path: Path | None = None, max_positions: int | None = None,
                  batch1_path: bool = True, decode_path: bool = True,
                  one_row_layouts: dict[tuple[int, int], str] | None = None) -> dict:
    """Write the optimized graph beside `plain_path` (sharing its external data); returns what was fused.
    `decode_path`: one-token calls without padding run a body whose attention rotates inside
    GroupQueryAttention (exporter/onnx/decode.py).

    `one_row_layouts` (fp32, without `batch1_path`): the MatMuls of those weight shapes (K, N) read the layout
    named (timing/kernels.py measured it faster for one row) in one-row calls (gemv.add_one_row_dispatch).

    Raises NotOptimizable with the reason when the graph cannot be rewritten safely.
    """
    plain_path = Path(plain_path)
    out_path = Path(out_path) if out_path else plain_path.with_name(OPT_FILE)
    if out_path.parent.resolve() != plain_path.parent.resolve():
        raise ValueError("the optimized graph must sit beside the plain one (it shares its external data)")
    proto = onnx.load(str(plain_path), load_external_data=False)
    g = Graph(proto.graph)
    inputs = {i.name: i for i in proto.graph.input}
    kept = kept_layers(inputs)
    elem = inputs[input_names(kept)[3]].type.tensor_type.elem_type if kept else None
    dtype = onnx_dtype_name(elem) if kept else None  # the cache's
    if kept and dtype not in ("float32", "float16"):
        raise NotOptimizable(f"{onnx.TensorProto.DataType.Name(elem)} graphs: ONNX Runtime's CPU "
                             "GroupQueryAttention runs fp32 and fp16 only")

    found = {i: _find_attention(g, i) for i in kept}  # all or nothing: raises before any change
    plans = {i: plan for i in kept if (plan := _plan_qkv_packing(g, found[i])) is not None}
    ropes = {i: rope_kind_for(config, i) for i in kept}
    caches = {}
    if kept:  # checked before anything is written
        head_dim = head_dim_of(config)
        for kind in sorted({r for r in ropes.values() if r is not None}):
            caches[kind] = rotary_caches(config, max_positions or config.max_position_embeddings, kind)
            if caches[kind][0].shape[-1] * 2 != head_dim:
                raise NotOptimizable("partial rotary embeddings are not handled")
    data_path = data_path_of(out_path)
    data_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)  # a graph left from an earlier run reads the data file just removed
    try:
        if plans:  # the concatenated q/k/v weights are new tensors: they go to model.opt.onnx.data
            _write_packed_weights(proto, plans, plain_path.parent, data_path)
            for i, plan in plans.items():
                found[i]["qkv"] = plan
        new_nodes = []
        if kept:
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
            shared_nodes, shared = _shared_inputs(proto, caches, numpy_dtype(dtype), split)
            new_nodes += shared_nodes
            for i in kept:
                for n in found[i]["remove"]:
                    proto.graph.node.remove(n)
                new_nodes += _add_gqa(g, proto, i, found[i], heads, kv_heads, shared, ropes[i])
        proto.graph.node.extend(new_nodes)
        drop_dead_nodes(proto.graph)
        g.reindex()
        norms, skips = _fuse_norms(g)
        drop_dead_nodes(proto.graph)
        drop_unused_initializers(proto.graph)
        try:
            topological_sort(proto.graph)
        except ValueError as exc:
            raise NotOptimizable(f"rewritten graph: {exc}") from None
        if not any(o.domain == MS for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(MS, 1))
        nodes = len(proto.graph.node)
        gemv = 0
        if batch1_path and (not kept or dtype == "float32"):  # one-row calls: unpacked (gemv.py)
            gemv = add_batch1_path(proto, data_path, plain_path.parent)
        folded = add_decode_path(proto, config, kept) if decode_path and kept else 0
        one_row = 0
        if one_row_layouts and not gemv and dtype == "float32":
            one_row = add_one_row_dispatch(proto, data_path, plain_path.parent, one_row_layouts)
        onnx.save(proto, str(out_path))
    except BaseException:  # nothing half-written: no data file without its graph, no graph without its data
        data_path.unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)
        raise
    # No onnx.checker here: SimplifiedLayerNormalization is an ONNX Runtime op in the default domain,
    # which the checker rejects. ONNX Runtime loading the graph, and parity, are the checks.
    return {"path": out_path.name, "data": data_path.name if data_path.exists() else None,
            "group_query_attention": len(kept), "packed_qkv": len(plans), "simplified_layer_norm": norms,
            "skip_simplified_layer_norm": skips, "nodes": nodes, "batch1_unpacked_matmuls": gemv,
            "one_row_dispatched_matmuls": one_row,
            "decode_folded_attention": folded}
