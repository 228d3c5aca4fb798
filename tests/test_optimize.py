"""The optimized graph (fused attention and norms) keeps the contract and passes the same parity checks."""

import collections

import onnx
import pytest

from conftest import CONFIGS, PROMPTS, make_mask
from exporter.onnx_export import export_onnx, onnx_signature
from exporter.optimize import OPT_FILE, NotOptimizable, optimize_onnx, rotary_caches
from exporter.parity import check_parity
from exporter.prompts import left_padded
from exporter.runners import HFRunner, OrtRunner
from exporter.surgery import apply_skip, masked

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
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["GroupQueryAttention"] == fused["group_query_attention"] == kept
    assert ops["RotaryEmbedding"] == 2 * kept
    assert ops["Softmax"] == 0 and ops["Pow"] == 0 and ops["Reciprocal"] == 0  # nothing left unfused
    # every kept sub-layer's norm plus the final norm is one fused node
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] > 0
    # the weights are not copied: the optimized graph points at the plain graph's external data file
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {plain.name + ".data"}
    assert opt.stat().st_size < 4 * 2**20


def test_rope_that_depends_on_length_is_refused(tiny_models):
    config = tiny_models["llama"][0].config.__class__(**{**tiny_models["llama"][0].config.to_dict(),
                                                          "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(NotOptimizable, match="dynamic"):
        rotary_caches(config, 16)


def test_unrecognised_graph_is_refused_without_writing(tmp_path):
    from onnx import TensorProto, helper

    # a graph with a past input but no attention pattern: refused, nothing written
    x = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 1, 1, 2])
    y = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 1, 1, 2])
    graph = helper.make_graph([helper.make_node("Identity", [x.name], [y.name])], "g", [x], [y])
    plain = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(plain))
    with pytest.raises(NotOptimizable):
        optimize_onnx(plain, None)
    assert not (tmp_path / OPT_FILE).exists()
