"""quantize_int4(source.onnx, out.onnx): weight-only int4 of an fp32 graph (MatMulNBits, block `block_size` along K).

Every MatMul whose B is a constant 2-D initializer becomes `com.microsoft.MatMulNBits` (4-bit weights, one fp32
scale and one uint4 zero point per block of `block_size` along K). Activations, norms, attention and the KV cache
stay fp32. `accuracy_level` is MatMulNBits' own attribute: 4 quantizes the activations to int8 per block for the dot
products (the fast CPU kernel), 0 leaves it unset (fp32 compute). Two methods (`export.int4.method`):

- `affine` (default): each block keeps its own affine grid, `w = s * q + lo` (q in 0..15). Weights read from a
  GGUF Q4_1 file (SmolLM2's `.Q4_1.gguf`: blocks of 32 along the input dim, `w = d*q + m`) already lie on such a
  grid; it is recovered per block (the largest grid step count <= 15 whose step fits every value), so those
  weights are reproduced exactly; other blocks get min-max (`s = (max - min) / 15`). The zero point `-lo / s` is
  in general not an integer: it is rounded to a uint4, and what that rounding moves, `r = s * (round(z) - z)` per
  block and output column, is added back exactly in form: the MatMul's input gains the block means of x
  (`x' = [x, mean_block(x)]`: one AveragePool over the last axis and a Concat, shared by the MatMuls reading the
  same x) and B gains the rows `block_size * r` (quantized like every other block of the same MatMulNBits, so the
  correction's own error is that of 4-bit offsets, about 1/15 of the rounding it removes). A MatMul whose offsets
  all round exactly keeps x. Cost: K grows by K/block_size and two small nodes per distinct input.
  `attention_output_offsets` (recipe `export.int4.attention_output_offsets`): `exact` (the default) corrects
  every MatMul; `rounded` leaves the attention output projections (the MatMuls reading GroupQueryAttention's
  output) without the correction, 2 nodes fewer per kept attention layer per step (52 of 226 on SmolLM2's default
  mask). Measured there (4 WikiText windows, KL to the full fp32 model): leaving it out of the output projections
  cost +0.009 (0.2490 -> 0.2581; validation-prompt KL 0.033 -> 0.064) for 1-2% of decode time (two A/B runs); out of the
  MLP down projections +0.128, out of the q/k/v and output projections +0.133, out of every norm's readers +0.339; a constant
  bias E[means] x offsets instead of the block means was worse than none (docs/results/speed.md, "int4 block means").
- `rtn`: ONNX Runtime's `MatMulNBitsQuantizer`, symmetric round-to-nearest (what onnxruntime-genai's builder
  runs for `-p int4`): faster (no extra K rows, no block-mean nodes) and much further from the fp32 graph on a
  Q4_1 source, whose 16 values per block a symmetric grid cannot hold.

Why `affine` packs its own blocks instead of calling ONNX Runtime's quantizer (docs/results/speed.md, section
"int4 quantizer: affine blocks vs round-to-nearest"): its asymmetric RTN rounds the zero point to a uint4, which
moves a whole Q4_1 block by up to half a step, and nothing adds that back (WikiText KL to the full model 0.80 on the
default recipe; the recovered grids with the zero point rounded and no correction 0.83; symmetric 0.75; affine
0.29; fp32 0.22); its HQQ and an exact float zero point give MatMulNBits float zero points, which
ONNX Runtime 1.32's CPU MatMulNBits runs without its fast kernel (6.1 ms per 576x1536 call at batch 1, 1 thread,
against 0.085 ms symmetric and 0.087 ms with uint4 zero points, accuracy level 4).

The tied LM head of our graphs is `MatMul(h, Transpose(embedding))`, which a quantizer does not see as a constant
weight: it is materialised as its own initializer first, so it is quantized like every other MatMul (`lm_head=False`
keeps it fp32). SmolLM2's embedding is Q8_0 in its GGUF, so its blocks are not on a 16-level grid: with min-max
blocks it was most of what the affine graph lost (validation KL 0.053 with it int4; 0.010 with it fp32 or 8-bit,
in an exact-offset prototype; 8-bit cost about 1.7 ms more per step there). So `lm_head_fit="weighted"` (the
recipe's default, `export.int4.lm_head_fit`) fits each off-grid LM head block to its input channels' weights: the
fp32 source runs the recorded reference's sequences (the validation prompts and their greedy tokens, 157 positions
on the default recipe) with the LM head's input as an extra output, each channel k gets `E[x_k^2]`, and each block
keeps, of five min-max ranges shrunk about their middle (x1 .. x0.8) each refitted three times by weighted least
squares of (lo, step) with the levels held, the grid of least `sum_k E[x_k^2] (w_k - w^_k)^2` (`weighted_grids`:
the diagonal of `||x W - x W^||^2`). Same MatMulNBits, same K and block size: the graph's nodes and shapes do not
change, only the LM head's values. On the default recipe (docs/results/speed.md, "int4 LM head"): that weighted
error 0.63 of min-max's, WikiText KL to the full model 0.2935 -> 0.2490 (fp32 skipped 0.2225), validation KL
0.053 -> 0.033; the int4 stage 16 -> 29 s. AWQ-style per-input-channel scaling folded into the final norm's
weight (s = mean|x_k|^alpha) did not help there: alpha 0 had the least LM head output error of 0, 0.25 .. 1.
The embedding Gather stays fp32 (it reads one row per token: quantizing it saves memory, not time).

The source is the optimized graph without the batch-1 branch (MatMulNBits has no packed/unpacked split to
dispatch on), so the int4 graph has the optimized graph's fused attention and norms. The MatMuls' inputs are
`[batch, sequence, K]` (rank 3, as every graph this project exports): AveragePool reads them as [N, C, L].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx.contract import data_path
from exporter.onnx.graph import drop_dead_nodes, drop_unused_initializers, initializer_array

LM_HEAD_WEIGHT = "int4.lm_head.weight"  # the materialised [hidden, vocab] LM head
METHODS = ("affine", "rtn")
OFFSET_CHOICES = ("exact", "rounded")  # attention_output_offsets
CHUNK = 4096  # output columns per grid search: bounds its float64 temporaries (the LM head has 49,152)
GRID_TOLERANCE = 1e-3  # a block is on a grid of step s when every (w - min) / s is this close to an integer


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


def attention_outputs(proto) -> set[str]:
    """The fused attentions' outputs: what the attention output projections read."""
    return {n.output[0] for n in proto.graph.node if n.op_type == "GroupQueryAttention"}


def lm_head_nodes(proto) -> list[str]:
    """The MatMuls whose constant weight has the vocabulary as its output width (the logits' last dim)."""
    logits = next(o for o in proto.graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2 and shapes[n.input[1]][1] == vocab]


# ---------------------------------------------------------------- affine blocks


def affine_blocks(w: np.ndarray, importance: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w [N, blocks, block] -> q (uint8, 0..15), scale, uint4 zero point, offset r, on_grid (all [N, blocks] but q)
    with `w = scale * (q - zero) + r` exactly up to float rounding for on-grid blocks (and min-max rounding else;
    with `importance` [blocks, block], the off-grid blocks' grids are `weighted_grids` instead of min-max)."""
    w = w.astype(np.float64)
    lo, hi = w.min(-1), w.max(-1)
    span = hi - lo
    wide = span > 0
    safe = np.where(wide, span, 1.0)
    steps = np.zeros(lo.shape, np.int64)
    for j in range(1, 16):  # the finest grid (most steps) that holds every value of the block
        t = (w - lo[..., None]) / (safe / j)[..., None]
        steps = np.where(np.abs(t - np.round(t)).max(-1) < GRID_TOLERANCE, j, steps)
    on_grid = (steps > 0) | ~wide
    scale = np.where(wide, safe / np.where(steps > 0, steps, 15), np.maximum(np.abs(lo), 1e-30) / 8)
    off_grid = wide & (steps == 0)
    if importance is not None and off_grid.any():
        fit_lo, fit_step = weighted_grids(w, importance)
        lo, scale = np.where(off_grid, fit_lo, lo), np.where(off_grid, fit_step, scale)
    q = np.clip(np.round((w - lo[..., None]) / scale[..., None]), 0, 15)
    z = -lo / scale  # w = scale * (q - z), z a float
    # a block using fewer than 16 levels may shift q up by t (z + t): keep the t whose z + t rounds least
    best_err, best_t, best_zi = None, None, None
    top = q.max(-1)
    for t in range(16):
        zi = np.clip(np.round(z + t), 0, 15)
        err = np.where(top + t <= 15, np.abs(zi - (z + t)), np.inf)
        if best_err is None:
            best_err, best_t, best_zi = err, np.zeros_like(top), zi
        else:
            better = err < best_err
            best_err, best_t, best_zi = (np.where(better, err, best_err), np.where(better, t, best_t),
                                         np.where(better, zi, best_zi))
    q = q + best_t[..., None]
    offset = scale * (best_zi - (z + best_t))  # w = scale * (q - zi) + offset
    return q.astype(np.uint8), scale.astype(np.float32), best_zi.astype(np.uint8), offset, on_grid


def _offset_blocks(offset: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The offset rows [N, rows] as uint4 blocks along K: min-max with 0 inside the range, uint4 zero point."""
    n, rows = offset.shape
    padded = np.zeros((n, -(-rows // block_size) * block_size))
    padded[:, :rows] = offset
    blocks = padded.reshape(n, -1, block_size)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(blocks / scale[..., None] + zero[..., None]), 0, 15)
    return q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def _pack4(values: np.ndarray) -> np.ndarray:
    """uint4 values along the last axis -> bytes, the even element in the low nibble (MatMulNBits' layout)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantize_affine(proto, block_size: int, accuracy_level: int, exclude: set[str],
                    importance: dict[str, np.ndarray] | None = None, rounded: set[str] = frozenset()) -> dict:
    """Rewrite `proto` (weights loaded) in place: constant-weight MatMuls -> MatMulNBits with affine blocks;
    `importance` maps MatMul names to their input channels' weights [K] for `weighted_grids`; the MatMuls reading
    a tensor named in `rounded` keep their rounded zero points without offset rows (no block means of that input)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes, augmented, added, fitted, left_rounded = [], {}, [], {}, set()
    on_grid, blocks, extra_rows = 0, 0, 0
    for n in g.node:
        b = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if b is None or len(b.dims) != 2 or n.name in exclude or b.dims[0] % block_size:
            nodes.append(n)
            continue
        k, cols = b.dims
        kb = k // block_size
        weight = numpy_helper.to_array(b)
        weights = (importance or {}).get(n.name)
        weights = None if weights is None else weights.reshape(kb, block_size)
        parts, errors = [], np.zeros(2)
        for c in range(0, cols, CHUNK):
            parts.append(affine_blocks(weight[:, c:c + CHUNK].T.reshape(-1, kb, block_size), weights))
            if weights is not None:  # importance-weighted squared error of these blocks and of plain min-max ones
                errors += _weighted_errors(weight[:, c:c + CHUNK], *parts[-1][:4], weights)
        if weights is not None:
            fitted[n.name] = errors
        q, scale, zero, offset, grid = (np.concatenate(a) for a in zip(*parts))
        del weight, parts
        on_grid, blocks = on_grid + int(grid.sum()), blocks + grid.size
        x, width = n.input[0], k
        if np.any(offset != 0) and x in rounded:
            left_rounded.add(x)
        elif np.any(offset != 0):  # offset rows, read by the block means of x
            oq, oscale, ozero = _offset_blocks(offset * block_size, block_size)  # means, not sums: x block_size
            q, scale, zero = (np.concatenate([q, oq], 1), np.concatenate([scale, oscale], 1),
                              np.concatenate([zero, ozero], 1))
            width = k + kb
            kept_blocks = -(-width // block_size)  # the offset rows' padding past K + kb holds no block
            q, scale, zero = q[:, :kept_blocks], scale[:, :kept_blocks], zero[:, :kept_blocks]
            extra_rows += kb
            if x not in augmented:
                augmented[x] = _block_means(nodes, x, block_size)
            x = augmented[x]
        name = b.name
        added += [numpy_helper.from_array(_pack4(q), f"{name}.int4"),
                  numpy_helper.from_array(scale.reshape(-1), f"{name}.int4_scales"),
                  numpy_helper.from_array(_pack4(zero), f"{name}.int4_zero_points")]
        attrs = {"K": width, "N": cols, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.int4", f"{name}.int4_scales", f"{name}.int4_zero_points"],
                                      list(n.output), name=f"{n.name}_Q4", domain="com.microsoft", **attrs))
    del g.node[:]
    g.node.extend(nodes)
    drop_dead_nodes(g)  # the LM head's Transpose of the embedding has no reader now
    g.initializer.extend(added)
    drop_unused_initializers(g)  # the fp32 weights the MatMulNBits replaced
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out = {"on_grid_blocks": round(on_grid / max(blocks, 1), 4), "offset_rows": extra_rows,
           "block_mean_inputs": len(augmented), "rounded_offset_inputs": len(left_rounded)}
    if fitted:  # sum_k importance_k (w_k - w^_k)^2 over the weighted MatMuls, weighted blocks / min-max blocks
        fit, minmax = (sum(e[i] for e in fitted.values()) for i in (0, 1))
        out["weighted_fit_error_ratio"] = round(float(fit / minmax), 4)
    return out


def _weighted_errors(weight, q, scale, zero, offset, importance) -> np.ndarray:
    """sum_k importance_k (w - w^)^2 of the blocks (q, scale, zero, offset: w^ before the offset rows' own 4-bit
    rounding) and of min-max blocks with an exact zero point, for weight [K, N]."""
    k, n = weight.shape
    kb, bs = importance.shape
    w = weight.T.reshape(n, kb, bs).astype(np.float64)
    got = scale[..., None].astype(np.float64) * (q.astype(np.float64) - zero[..., None]) + offset[..., None]
    lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 15, 1.0)
    minmax = lo + step * np.round((w - lo) / step)
    return np.array([(importance * (got - w) ** 2).sum(), (importance * (minmax - w) ** 2).sum()])


def _block_means(nodes: list, x: str, block_size: int) -> str:
    """Append the nodes of `[x, mean over each block of x]` along the last axis; returns that tensor's name.
    One AveragePool over the last axis ([batch, sequence, K] reads as [N, C, L]) instead of Reshape + ReduceSum:
    a node less per input (the offset rows are scaled by block_size to take means)."""
    nodes += [helper.make_node("AveragePool", [x], [f"{x}.int4_block_means"], name=f"{x}.int4_block_means",
                               kernel_shape=[block_size], strides=[block_size]),
              helper.make_node("Concat", [x, f"{x}.int4_block_means"], [f"{x}.int4_with_means"],
                               name=f"{x}.int4_with_means", axis=-1)]
    return f"{x}.int4_with_means"


# ---------------------------------------------------------------- the LM head's activation-weighted blocks

LM_HEAD_FITS = ("weighted", "minmax")
FIT_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)  # the min-max range shrunk about its middle: each a starting grid
FIT_ITERATIONS = 3  # weighted least-squares refits of (lo, step) per starting grid


def reference_sequences(recorded) -> list[tuple[np.ndarray, np.ndarray]]:
    """The recorded reference's batches as teacher-forced sequences: (input_ids, attention_mask), the prompts
    followed by the reference's greedy tokens (all but the last, which no position reads)."""
    out = []
    for b in recorded:
        tokens = b.tokens[:, :len(b.steps)]
        out.append((np.concatenate([b.input_ids, tokens], 1).astype(np.int64),
                    np.concatenate([b.attention_mask, np.ones_like(tokens)], 1).astype(np.int64)))
    return out


def matmul_inputs(source: Path, x: str, sequences) -> np.ndarray:
    """The activations [n, K] of tensor `x` (a MatMul's input) when the fp32 `source` runs each sequence in one
    prefill (padding positions dropped)."""
    from exporter.onnx.session import open_session
    import torch

    from exporter.onnx.contract import is_past
    from exporter.onnx.contract import position_ids

    proto = onnx.load(str(source), load_external_data=False)
    proto.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    probe = source.parent / f"{source.stem}.int4-calibration.onnx"  # beside the source: same external data
    onnx.save(proto, str(probe))
    try:
        session = open_session(probe, threads=1)
        pasts = [i for i in session.get_inputs() if is_past(i.name)]
        rows = []
        for ids, mask in sequences:
            positions = position_ids(torch.from_numpy(mask)).numpy().astype(np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            feeds.update({p.name: np.zeros((ids.shape[0], p.shape[1], 0, p.shape[3]), np.float32) for p in pasts})
            rows.append(session.run([x], feeds)[0][mask.astype(bool)])
        return np.concatenate(rows).astype(np.float32)
    finally:
        probe.unlink(missing_ok=True)


def weighted_grids(w: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, blocks, block] (float64), importance [blocks, block] (mean x_k^2 of the input channel each weight
    multiplies) -> lo, step [N, blocks]: per block the 16-level grid `lo + step * q` (q in 0..15) with the least
    importance-weighted squared error to w found from each of FIT_CLIPS' shrunk min-max ranges by FIT_ITERATIONS
    least-squares refits of (lo, step) with the levels held."""
    wt = np.broadcast_to(importance.astype(np.float64), w.shape)
    lo0, hi0 = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    mid = (lo0 + hi0) / 2
    sw = wt.sum(-1, keepdims=True)
    sb = (wt * w).sum(-1, keepdims=True)
    best_lo = best_step = best_err = None
    for clip in FIT_CLIPS:
        lo = mid - (mid - lo0) * clip
        step = np.where(hi0 > lo0, (hi0 - lo0) * clip / 15, 1.0)
        for _ in range(FIT_ITERATIONS):
            q = np.clip(np.round((w - lo) / step), 0, 15)
            sq, sqq = (wt * q).sum(-1, keepdims=True), (wt * q * q).sum(-1, keepdims=True)
            sqb = (wt * q * w).sum(-1, keepdims=True)
            det = sw * sqq - sq * sq
            fit = det > 1e-12 * np.maximum(sw * sqq, 1e-300)
            new_step = np.where(fit, (sw * sqb - sq * sb) / np.where(fit, det, 1), step)
            keep = new_step > 0
            lo = np.where(keep, (sb - new_step * sq) / sw, lo)
            step = np.where(keep, new_step, step)
        q = np.clip(np.round((w - lo) / step), 0, 15)
        err = (wt * (lo + step * q - w) ** 2).sum(-1, keepdims=True)
        if best_err is None:
            best_lo, best_step, best_err = lo, step, err
        else:
            better = err < best_err
            best_lo, best_step, best_err = (np.where(better, lo, best_lo), np.where(better, step, best_step),
                                            np.where(better, err, best_err))
    return best_lo[..., 0], best_step[..., 0]


# ---------------------------------------------------------------- entry point


def _ort_rtn(proto, block_size: int, accuracy_level: int, exclude: list[str]):
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # importing it calls logging.basicConfig(level=INFO): every library's INFO lines (a line per node) would print
    root.setLevel(level)
    root.handlers[:] = handlers
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level or None, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


def quantize_int4(source: Path, out_path: Path, block_size: int = 32, accuracy_level: int = 4,
                  lm_head: bool = True, method: str = "affine", lm_head_fit: str = "minmax",
                  calibration=None, attention_output_offsets: str = "exact") -> dict:
    """Write the int4 graph of `source` (fp32, external data beside it) to `out_path` + `out_path.data`;
    returns what was quantized. `lm_head_fit="weighted"` (method affine, LM head int4): the LM head's off-grid
    blocks get `weighted_grids`, weighted by its input channels' mean square on `calibration` ((input_ids,
    attention_mask) sequences run through `source`). `attention_output_offsets="rounded"` (method affine): the
    MatMuls reading a GroupQueryAttention's output (the attention's output projection) keep their zero points
    rounded, without offset rows or block means."""
    if method not in METHODS:
        raise ValueError(f"int4 method {method!r}: one of {METHODS}")
    if lm_head_fit not in LM_HEAD_FITS:
        raise ValueError(f"int4 lm_head_fit {lm_head_fit!r}: one of {LM_HEAD_FITS}")
    if attention_output_offsets not in OFFSET_CHOICES:
        raise ValueError(f"int4 attention_output_offsets {attention_output_offsets!r}: one of {OFFSET_CHOICES}")
    if lm_head_fit == "weighted" and not calibration:
        raise ValueError("int4 lm_head_fit weighted needs calibration sequences")
    source, out_path = Path(source), Path(out_path)
    proto = onnx.load(str(source), load_external_data=False)
    materialize_transposed_weights(proto, source.parent)
    head = lm_head_nodes(proto)
    onnx.load_external_data_for_model(proto, str(source.parent))
    exclude = [] if lm_head else head
    extra, importance = {"lm_head_fit": "minmax" if method == "affine" and lm_head and head else None}, {}
    if lm_head_fit == "weighted" and method == "affine" and lm_head:
        readers = {n.name: n.input[0] for n in proto.graph.node if n.name in head}
        for name, x in readers.items():
            importance[name] = (matmul_inputs(source, x, calibration).astype(np.float64) ** 2).mean(0)
        extra = {"lm_head_fit": "weighted" if importance else "minmax",
                 "lm_head_calibration_rows": int(sum(mask.sum() for _, mask in calibration))}
    if method == "affine":
        rounded = set() if attention_output_offsets == "exact" else attention_outputs(proto)
        extra["attention_output_offsets"] = attention_output_offsets
        extra.update(quantize_affine(proto, block_size, accuracy_level, set(exclude), importance, rounded))
        out = proto
    else:
        out = _ort_rtn(proto, block_size, accuracy_level, exclude)
        del proto
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path(out_path).unlink(missing_ok=True)
    onnx.save(out, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_path(out_path).name, size_threshold=1024)
    mask = os.umask(0)
    os.umask(mask)
    data_path(out_path).chmod(0o666 & ~mask)  # onnx writes external data 0600; the other files follow the umask
    ops = [n.op_type for n in out.graph.node]
    return {"method": method, "matmul_nbits": ops.count("MatMulNBits"), "matmul_fp32": ops.count("MatMul"),
            "block_size": block_size, "accuracy_level": accuracy_level,
            "lm_head": "int4" if lm_head and head else "fp32", "embedding": "fp32 (Gather)", **extra}
