"""The optimized graph (fused attention and norms) keeps the contract and passes the same parity checks."""

import collections

import onnx
import pytest

from conftest import CONFIGS, PROMPTS, make_mask
from exporter.onnx.decode import DISPATCH
from exporter.onnx.gemv import ROW
from exporter.onnx.graph import body_graph
from exporter.onnx.contract import onnx_signature
from exporter.onnx.export import export_onnx
from exporter.onnx.contract import OPT_FILE
from exporter.onnx.optimize import NotOptimizable, optimize_onnx, rotary_caches
from exporter.checks.parity import check_parity
from exporter.model.prompts import left_padded
from exporter.backends.ort import OrtRunner
from exporter.backends.pytorch import HFRunner
from exporter.model.surgery import apply_skip, masked
from helpers import one_node_onnx

# every architecture with attention skipped (mistral: sliding window), plus a whole block gone
CASES = [(arch, "attention") for arch in CONFIGS] + [("qwen3", "block")]


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """(arch, mask) -> (plain path, optimized path, what was fused); exported once per module."""
    out = {}
    for arch, mask_name in CASES:
        model, _ = tiny_models[arch]
        folder = tmp_path_factory.mktemp(f"{arch}-{mask_name}")
        plain = export_onnx(apply_skip(model, make_mask(mask_name)), folder)
        out[(arch, mask_name)] = plain, folder / OPT_FILE, optimize_onnx(plain, model.config)
    return out


def nodes_run(path, tmp_path, batch: int, new: int) -> set[str]:
    """The node events of ORT's profile of one call of the graph at `path`: `new` tokens per row after 3 cached."""
    import json
    from pathlib import Path

    import onnxruntime as ort

    from exporter.timing import worker

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"{Path(path).stem}-b{batch}n{new}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, worker.make_feeds(session, batch, new, 3))
    return {e["name"] for e in json.loads(Path(session.end_profiling()).read_text()) if e.get("cat") == "Node"}


@pytest.mark.parametrize("arch,mask_name", CASES)
def test_optimized_graph_parity_with_left_padding(tiny_models, exported, arch, mask_name):
    model, tok = tiny_models[arch]
    mask = make_mask(mask_name)
    _, opt, _ = exported[(arch, mask_name)]
    ids, attn = left_padded(tok, PROMPTS)  # batch 2, left-padded, longer than the sliding windows
    assert not attn.all()
    with masked(model, mask):
        phases, _ = check_parity(HFRunner(model), OrtRunner(opt), ids, attn, 6, 1e-4, 1e-4, "onnx:optimized")
    for p in phases:
        assert p.passed and p.greedy_match, p


@pytest.mark.parametrize("arch,mask_name", CASES)
def test_optimized_graph_keeps_the_contract_and_fuses(exported, arch, mask_name):
    plain, opt, fused = exported[(arch, mask_name)]
    assert onnx_signature(opt) == onnx_signature(plain)  # names, dtypes and named dims, in order
    kept = len(make_mask(mask_name).kept_attention(4))
    proto = onnx.load(str(opt), load_external_data=False)
    ops = collections.Counter(n.op_type for n in body_graph(proto).node)
    assert ops["GroupQueryAttention"] == fused["group_query_attention"] == kept
    assert ops["Softmax"] == 0 and ops["Pow"] == 0 and ops["Reciprocal"] == 0  # nothing left unfused
    # every kept sub-layer's norm plus the final norm is one fused node
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] > 0
    # weights are not copied: the optimized graph reads the plain graph's external data file, and only the
    # concatenated (packed) weights are new, in model.opt.onnx.data
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    location = {t.name: next(e.value for e in t.external_data if e.key == "location") for t in external}
    assert set(location.values()) <= {plain.name + ".data", OPT_FILE + ".data"}
    packed = {n for n, loc in location.items() if loc == OPT_FILE + ".data" and not n.startswith(ROW)}
    assert all(n.startswith("opt.layers.") and n.endswith(".qkv_proj.weight") for n in packed)
    assert len(packed) == fused["packed_qkv"]
    # the batch-1 branch's new bytes are transposed copies (exporter/gemv.py); its other weights are views
    row_in_opt_data = {n for n, loc in location.items() if loc == OPT_FILE + ".data" and n.startswith(ROW)}
    assert all(n.endswith(".T") for n in row_in_opt_data - {ROW + n for n in packed})
    assert opt.stat().st_size < 4 * 2**20


@pytest.mark.parametrize("arch,mask_name", CASES)
def test_qkv_projections_are_packed_then_rotated_at_position_ids(exported, arch, mask_name):
    """q/k/v become one MatMul (+ one bias Add for qwen2) and a Split; qwen3's q/k norms sit between
    projection and attention, so its three MatMuls stay. q and k are rotated by RotaryEmbedding at
    `position_ids` (as in the plain graph), not by GroupQueryAttention at cache slots."""
    _, opt, fused = exported[(arch, mask_name)]
    mask = make_mask(mask_name)
    kept_attention, kept_mlp = len(mask.kept_attention(4)), 4 - len(mask.mlp)
    proto = onnx.load(str(opt), load_external_data=False)
    ops = collections.Counter(n.op_type for n in body_graph(proto).node)
    packable = arch != "qwen3"
    assert fused["packed_qkv"] == (kept_attention if packable else 0)
    per_attention = 2 if packable else 4  # qkv + o, or q, k, v + o
    assert ops["MatMul"] == per_attention * kept_attention + 3 * kept_mlp + 1  # + the LM head
    assert ops["Split"] == (kept_attention if packable else 0)
    assert ops["RotaryEmbedding"] == 2 * kept_attention
    nodes = body_graph(proto).node
    rotary_inputs = {n.output[0]: n.input[1] for n in nodes if n.op_type == "RotaryEmbedding"}
    for node in nodes:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["do_rotary"] == 0 and node.input[10]  # no slot-index rotary; our bias as attention_bias
            assert rotary_inputs[node.input[0]] == rotary_inputs[node.input[1]] == "position_ids"
            assert node.input[2] and not any(node.input[7:10])  # separate v; no cos/sin/position inputs


@pytest.mark.parametrize("arch,mask_name", CASES)
def test_batch1_decode_reads_unpacked_weights(tiny_models, exported, arch, mask_name):
    """Batch-1 decode steps run the If's batch-1 branch, whose MatMuls read unpacked 3-D weights: B [1, K, N]
    where K <= N, B transposed [1, N, K] (FusedMatMul transB) where K > N; views of the packed branch's
    weights where the layout allows (same bytes of the same file), else transposed copies. The logits
    match the masked PyTorch model over several greedy steps."""
    model, tok = tiny_models[arch]
    mask = make_mask(mask_name)
    plain, opt, fused = exported[(arch, mask_name)]
    proto = onnx.load(str(opt), load_external_data=False)
    dispatch = proto.graph.node[-1]
    assert dispatch.op_type == "If" and [n.op_type for n in proto.graph.node] == ["Size", "Equal", "If"]
    row = next(a.g for a in dispatch.attribute if a.name == "then_branch")
    inits = {t.name: t for t in proto.graph.initializer}
    # the batch-1 branch holds the decode dispatch (exporter/onnx/decode.py): both of its bodies read unpacked
    bodies = [a.g for a in row.node[-1].attribute]
    assert row.node[-1].op_type == "If" and len(bodies) == 2
    matmuls = [n for body in bodies for n in body.node if n.op_type in ("MatMul", "FusedMatMul")]
    assert len(matmuls) == 2 * fused["batch1_unpacked_matmuls"] == \
        2 * sum(n.op_type == "MatMul" for n in body_graph(proto).node)
    transposed_b = 0
    for n in matmuls:
        w = inits[n.input[1]]
        assert w.dims[0] == 1 and len(w.dims) == 3, n.name
        trans_b = n.op_type == "FusedMatMul"
        assert trans_b == any(a.name == "transB" and a.i == 1 for a in n.attribute)
        k, n_out = (w.dims[2], w.dims[1]) if trans_b else (w.dims[1], w.dims[2])
        assert trans_b == (k > n_out), n.name  # the layout rule
        transposed_b += trans_b
        if not w.name.endswith(".T"):  # a view: the 2-D weight's bytes, not a copy
            original = inits[w.name[len(ROW):]]
            assert list(w.dims[1:]) == list(original.dims)
            assert w.external_data == original.external_data and w.raw_data == original.raw_data
    kept_mlp = 4 - len(mask.mlp)
    assert transposed_b >= kept_mlp  # at least the down projections (intermediate > hidden in every tiny config)
    ids, attn = left_padded(tok, PROMPTS[:1])
    assert attn.all() and ids.shape[0] == 1
    with masked(model, mask):
        phases, _ = check_parity(HFRunner(model), OrtRunner(opt), ids, attn, 6, 1e-4, 1e-4, "onnx:optimized")
    for p in phases:
        assert p.passed and p.greedy_match, p


def test_dispatch_runs_the_batch1_branch_only_for_one_row(tiny_models, exported, tmp_path):
    """ORT's profile names the nodes that ran: a one-token batch-1 step runs the batch-1 branch's MatMuls,
    a prompt or a batch of two the packed branch's."""
    _, opt, _ = exported[("llama", "attention")]
    ran = {}
    for batch, new in ((1, 1), (2, 1), (1, 5)):
        # FusedMatMul nodes keep their MatMul names
        ran[(batch, new)] = {n for n in nodes_run(opt, tmp_path, batch, new) if "MatMul" in n}
        assert ran[(batch, new)], "no MatMul in the profile"
    assert all(ROW in n for n in ran[(1, 1)])  # ROW, or DECODE + ROW: the batch-1 branch's decode body
    for case in ((2, 1), (1, 5)):
        assert not any(ROW in n for n in ran[case]), case


def test_batch1_path_can_be_turned_off(tiny_models, tmp_path):
    """`export.batch1_decode_path: false`: one graph with packed weights only, no If, no transposed copy."""
    model, _ = tiny_models["qwen3"]  # tied LM head: the batch-1 path would add its transposed copy
    plain = export_onnx(apply_skip(model, make_mask("attention")), tmp_path)
    fused = optimize_onnx(plain, model.config, batch1_path=False)
    proto = onnx.load(str(tmp_path / OPT_FILE), load_external_data=False)
    assert fused["batch1_unpacked_matmuls"] == 0
    assert not any(n.name == "batch1_dispatch" for n in proto.graph.node)
    assert proto.graph.node[-1].name == DISPATCH  # only the decode dispatch (exporter/onnx/decode.py)
    assert not any(t.name.startswith(ROW) for t in proto.graph.initializer)
    fused = optimize_onnx(plain, model.config, batch1_path=False, decode_path=False)
    proto = onnx.load(str(tmp_path / OPT_FILE), load_external_data=False)
    assert fused["decode_folded_attention"] == 0
    assert "If" not in {n.op_type for n in proto.graph.node} and body_graph(proto) is proto.graph


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: a tied LM head (Transpose of the embedding)
def test_one_row_dispatch_reads_the_measured_layouts(tiny_models, tmp_path, arch):
    """`one_row_layouts` (what bench/kernels.py measured faster for one row): in the decode body, each MatMul of a
    shape named unpacked/transposed becomes If(one row) -> that layout, else the packed MatMul as it was; shapes
    named packed (or not named) are untouched. Parity over greedy steps at batch 1 (the one-row MatMuls) and for a
    left-padded batch of two (the packed ones), and ORT's profile shows which ran."""
    from exporter.onnx.decode import decode_body
    from exporter.onnx.gemv import ONE_ROW, matmul_weight_shapes

    model, tok = tiny_models[arch]
    mask = make_mask("attention")
    plain = export_onnx(apply_skip(model, mask), tmp_path)
    optimize_onnx(plain, model.config, batch1_path=False)
    shapes = sorted(matmul_weight_shapes(tmp_path / OPT_FILE))
    assert len(shapes) >= 3
    # every other shape one-row: both kinds of one-row layout, and some shapes left packed
    layouts = {shape: ("packed", "unpacked" if i % 4 == 1 else "transposed")[i % 2] for i, shape in enumerate(shapes)}
    out = tmp_path / "row.onnx"
    fused = optimize_onnx(plain, model.config, out_path=out, batch1_path=False, one_row_layouts=layouts)
    proto = onnx.load(str(out), load_external_data=False)
    body = decode_body(proto.graph)
    assert body is not proto.graph  # the dispatches sit in the decode branch
    inits = {t.name: t for t in proto.graph.initializer}
    dispatches = [n for n in body.node if n.op_type == "If" and n.name.startswith(ONE_ROW)]
    assert len(dispatches) == fused["one_row_dispatched_matmuls"] > 0
    for d in dispatches:
        (row,) = next(a.g for a in d.attribute if a.name == "then_branch").node
        (general,) = next(a.g for a in d.attribute if a.name == "else_branch").node
        w = inits[row.input[1]]
        assert len(w.dims) == 3 and w.dims[0] == 1 and general.op_type == "MatMul"
        transposed = row.op_type == "FusedMatMul"
        k, n = (w.dims[2], w.dims[1]) if transposed else (w.dims[1], w.dims[2])
        assert layouts[(k, n)] == ("transposed" if transposed else "unpacked")
    left = [n for n in body.node if n.op_type == "MatMul"]
    assert left and all(layouts.get((inits[n.input[1]].dims[0], inits[n.input[1]].dims[1]), "packed") == "packed"
                        for n in left if n.input[1] in inits)
    ids, attn = left_padded(tok, PROMPTS)
    with masked(model, mask):
        for rows, cols in ((ids[:1], attn[:1]), (ids, attn)):
            phases, _ = check_parity(HFRunner(model), OrtRunner(out), rows, cols, 6, 1e-4, 1e-4, "onnx:one-row")
            assert all(p.passed and p.greedy_match for p in phases), phases
    ran = {case: {n for n in nodes_run(out, tmp_path, *case) if ONE_ROW in n} for case in ((1, 1), (2, 1), (1, 5))}
    assert sum("/row_kernel_time" in n for n in ran[(1, 1)]) == len(dispatches)
    assert not any("/row_kernel_time" in n for case in ((2, 1), (1, 5)) for n in ran[case])


def test_one_row_layouts_time_each_shape_and_keep_packed_unless_beaten():
    """bench/kernels.py: every layout timed per shape (products checked equal first), the choice packed unless
    another layout is faster by the margin."""
    from exporter.timing.kernels import one_row_layouts

    result = one_row_layouts({(64, 96), (96, 64)}, budget_s=0.05)
    assert set(result["layouts"]) == {(64, 96), (96, 64)} and result["machine"]["threads"] == 1
    for (k, n), how in result["layouts"].items():
        us = result["median_us_per_matmul"][f"{k}x{n}"]
        assert set(us) == {"packed", "unpacked", "transposed"} and all(v > 0 for v in us.values())
        best = min(us, key=us.get)
        assert how == (best if us[best] < (1 - result["margin"]) * us["packed"] else "packed")
    never = one_row_layouts({(64, 96)}, budget_s=0.05, margin=1.0)  # no layout beats packed by 100%
    assert never["layouts"] == {(64, 96): "packed"}


def _decode_body(proto):
    """The decode branch of the packed (else) branch of the batch-1 dispatch."""
    packed = next(a.g for a in proto.graph.node[-1].attribute if a.name == "else_branch")
    assert packed.node[-1].name.endswith(DISPATCH)
    return next(a.g for a in packed.node[-1].attribute if a.name == "then_branch")


@pytest.mark.parametrize("arch,mask_name", CASES)
def test_decode_body_rotates_inside_attention(tiny_models, exported, arch, mask_name):
    """The decode body (one token per row, no padding) has no RotaryEmbedding and no Split: every attention is one
    GroupQueryAttention with do_rotary=1 at `position_ids` on the packed q/k/v (qwen3: q, k, v), with the
    bias only where the layer has a sliding window (mistral: every layer; qwen2: layers 2 and 3)."""
    from exporter.architectures import sliding_window_for

    config = tiny_models[arch][0].config
    _, opt, fused = exported[(arch, mask_name)]
    body = _decode_body(onnx.load(str(opt), load_external_data=False))
    ops = collections.Counter(n.op_type for n in body.node)
    kept = make_mask(mask_name).kept_attention(4)
    assert ops["RotaryEmbedding"] == ops["Split"] == 0
    assert ops["GroupQueryAttention"] == fused["decode_folded_attention"] == len(kept)
    for node in body.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = int(node.output[1].split(".")[-2])
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
        assert node.input[7] and node.input[8]  # cos/sin caches; no position_ids (the dispatch checked them)
        assert len(node.input) < 10 or not node.input[9]
        assert bool(node.input[1]) == (arch == "qwen3")  # packed q/k/v reads one input
        bias = len(node.input) > 10 and node.input[10]
        assert bool(bias) == (sliding_window_for(config, layer) is not None), layer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decode_body_gives_the_prompt_bodys_outputs(tiny_models, exported, arch, tmp_path):
    """Unpadded batches of 2 decoded 5 steps, the graph with the decode body against the same graph without it:
    same logits and caches. Rows at the cache length's position (the usual case) take the decode body; rows at
    positions of the caller's choosing (row 2 three ahead) take the prompt body, since the folded attention
    rotates at the cache length (ORT's profile says which body ran). A left-padded batch takes the prompt body:
    covered by the parity tests above."""
    import json
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from exporter.onnx.decode import DECODE

    model, _ = tiny_models[arch]
    plain, opt, _ = exported[(arch, "attention")]
    without = plain.with_name("model.nodecode.onnx")
    optimize_onnx(plain, model.config, out_path=without, decode_path=False)
    config = model.config
    head = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    for shift, decode_body_runs in ((0, True), (3, False)):
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / f"shift{shift}")
        sessions = [ort.InferenceSession(str(opt), options, providers=["CPUExecutionProvider"]),
                    ort.InferenceSession(str(without), providers=["CPUExecutionProvider"])]
        past_names = [i.name for i in sessions[0].get_inputs() if i.name.startswith("past_key_values.")]
        rng = np.random.default_rng(0)
        ids = rng.integers(1, config.vocab_size, (2, 5))
        positions = np.arange(5)[None] + np.array([[0], [shift]])
        mask = np.ones((2, 5), np.int64)
        state = [{n: np.zeros((2, config.num_key_value_heads, 0, head), np.float32) for n in past_names}] * 2
        for step in range(5):
            outs = []
            for i, sess in enumerate(sessions):
                feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **state[i]}
                outs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))))
            for name in outs[0]:
                assert np.abs(outs[0][name] - outs[1][name]).max() <= 1e-5, (shift, step, name)
            state = [{n: out[n.replace("past_key_values", "present")] for n in past_names} for out in outs]
            ids = outs[0]["logits"][:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            mask = np.ones((2, mask.shape[1] + 1), np.int64)
        events = json.loads(Path(sessions[0].end_profiling()).read_text())
        ran = {e["name"] for e in events if e.get("cat") == "Node"}
        assert any(n.startswith(DECODE) for n in ran) == decode_body_runs, shift


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_optimized_graph_continues_a_prompt_in_chunks(tiny_models, exported, arch):
    """A prompt continued 3 tokens at once after a cached prefix (past > 0, sequence > 1) gives the plain graph's
    logits at batch 1. At batch > 1 ONNX Runtime's CPU GroupQueryAttention refuses such a call (a known
    limit of the optimized graph, documented; prefill from an empty past and one-token decode are unaffected)."""
    import torch

    _, tok = tiny_models[arch]
    plain, opt, _ = exported[(arch, "attention")]
    ids, attn = left_padded(tok, PROMPTS[:1])
    logits = {}
    for name, path in (("plain", plain), ("opt", opt)):
        runner = OrtRunner(path)
        first = runner.prefill(ids[:, :-3], attn[:, :-3])
        logits[name] = first, runner.forward(ids[:, -3:], attn, runner.next_position + torch.arange(3))
    for a, b in zip(logits["plain"], logits["opt"]):
        assert (a - b).abs().max() < 1e-4
    ids, attn = left_padded(tok, PROMPTS)
    runner = OrtRunner(opt)
    runner.prefill(ids[:, :-3], attn[:, :-3])
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1 and past context"):
        runner.forward(ids[:, -3:], attn, runner.next_position + torch.arange(3))


def test_left_padded_cache_equals_the_plain_graphs(tiny_models, exported):
    """Rotary at `position_ids` in both graphs: present.* match the plain graph's at every real token,
    padded rows included, so the two graphs' caches are interchangeable. (Slots of padding hold what a
    query that attends to nothing computes, which differs between the graphs and is masked in both.)"""
    import numpy as np

    _, tok = tiny_models["llama"]
    plain, opt, _ = exported[("llama", "attention")]
    ids, attn = left_padded(tok, PROMPTS)
    assert (attn == 0).any()
    caches = []
    for path in (plain, opt):
        runner = OrtRunner(path)
        runner.prefill(ids, attn)
        caches.append(runner.past)
    real = attn.numpy().astype(bool)  # [batch, slot]
    for name in caches[0]:
        diff = np.abs(caches[0][name] - caches[1][name]).transpose(0, 2, 1, 3)  # [batch, slot, head, dim]
        assert diff[real].max() < 1e-5, name


def test_rope_that_depends_on_length_is_refused(tiny_models):
    config = tiny_models["llama"][0].config.__class__(**{**tiny_models["llama"][0].config.to_dict(),
                                                          "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(NotOptimizable, match="dynamic"):
        rotary_caches(config, 16)


def test_unrecognised_graph_is_refused_without_writing(tmp_path):
    # a graph with a past input but no attention pattern: refused, nothing written
    plain = one_node_onnx(tmp_path / "model.onnx", inputs=["past_key_values.0.key"], outputs=["present.0.key"],
                          shape=(1, 1, 1, 2))
    with pytest.raises(NotOptimizable):
        optimize_onnx(plain, None)
    assert not (tmp_path / OPT_FILE).exists()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_right_padded_batch_with_holes_matches_the_plain_graph(tiny_models, exported, arch):
    """onnxruntime-genai right-pads a batch's prompts and appends each step after the padding, so a short
    row's mask has a hole ([1, 1, 0, 0, 1]) and its positions skip the padding. Both graphs read rotary
    positions from `position_ids`, so their logits agree at every real token, over several steps.
    (Mistral's 5-token window counts cache slots in both graphs, so there the short row's decode steps see
    only padding and itself: that case checks the two graphs agree, not the rotary.)"""
    import numpy as np
    import onnxruntime as ort

    _, tok = tiny_models[arch]
    plain, opt, _ = exported[(arch, "attention")]
    rows = [tok.encode(p) for p in PROMPTS]
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    assert (mask == 0).any()
    positions = np.array([list(range(width))] * len(rows), dtype=np.int64)
    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for n, p in
                (("plain", plain), ("opt", opt))}
    past_names = [i.name for i in sessions["plain"].get_inputs() if i.name.startswith("past_key_values.")]
    head_dim = sessions["plain"].get_inputs()[3].shape[-1]
    kv_heads = CONFIGS[arch]["num_key_value_heads"]
    state = {n: {name: np.zeros((len(rows), kv_heads, 0, head_dim), np.float32) for name in past_names}
             for n in sessions}
    next_pos = np.array([[len(r)] for r in rows], dtype=np.int64)
    for step in range(4):
        logits = {}
        for n, sess in sessions.items():
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **state[n]}
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            logits[n] = out["logits"]
            state[n] = {name: out[name.replace("past_key_values", "present")] for name in past_names}
        real = mask[:, -ids.shape[1]:].astype(bool)  # padding queries attend to nothing: not compared
        assert np.abs(logits["plain"][real] - logits["opt"][real]).max() < 1e-4, step
        last = np.array([[logits["plain"][b, (real[b].nonzero()[0][-1])].argmax()] for b in range(len(rows))])
        ids, positions = last.astype(np.int64), next_pos.copy()
        next_pos += 1
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)


def test_linked_external_data_is_one_clear_line_and_leaves_nothing(tiny_models, exported, tmp_path):
    """onnx refuses external data behind a symbolic link (or with several hard links): said as one line
    with the remedy, and no half-written model.opt.onnx(.data) is left."""
    from exporter.errors import UserError

    plain, _, _ = exported[("llama", "attention")]
    (tmp_path / plain.name).write_bytes(plain.read_bytes())
    (tmp_path / (plain.name + ".data")).symlink_to(plain.with_name(plain.name + ".data"))
    with pytest.raises(UserError, match=r"only from a plain file .*\(cp --remove-destination\)") as err:
        optimize_onnx(tmp_path / plain.name, tiny_models["llama"][0].config)
    assert "\n" not in str(err.value)
    assert not (tmp_path / OPT_FILE).exists() and not (tmp_path / (OPT_FILE + ".data")).exists()


def test_a_candidate_graph_moved_into_place_reads_its_own_and_the_plain_graphs_data(tiny_models, tmp_path):
    """The tuner builds a candidate under another name and renames the winner (exporter/onnx/graph.move_graph):
    its packed weights follow it into model.opt.onnx.data, the plain graph's weights stay shared, and it runs
    with parity."""
    from exporter.onnx.contract import data_path
    from exporter.onnx.graph import move_graph

    model, tok = tiny_models["llama"]
    plain = export_onnx(apply_skip(model, make_mask("attention")), tmp_path)
    candidate = tmp_path / "tune-branch.onnx"
    fused = optimize_onnx(plain, model.config, out_path=candidate)
    assert fused["data"] == "tune-branch.onnx.data" and fused["batch1_unpacked_matmuls"] > 0
    move_graph(candidate, tmp_path / OPT_FILE)
    assert not candidate.exists() and not data_path(candidate).exists()
    proto = onnx.load(str(tmp_path / OPT_FILE), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {plain.name + ".data", OPT_FILE + ".data"}
    ids, attn = left_padded(tok, PROMPTS)
    with masked(model, make_mask("attention")):  # batch 1 decodes through the branch's moved, unpacked weights
        phases, _ = check_parity(HFRunner(model), OrtRunner(tmp_path / OPT_FILE), ids[:1], attn[:1], 4, 1e-4, 1e-4,
                                 "onnx:moved")
    assert all(p.passed and p.greedy_match for p in phases), phases
