"""Half-precision ONNX: what stays fp32 in the graph, parity in ONNX Runtime (CPU), and 'not run' for bf16."""

import onnx
import pytest

from conftest import PROMPTS, make_mask
from exporter.errors import UserError
from exporter.onnx.session import ort_unsupported_op
from exporter.dtypes import precision_of
from exporter.onnx.contract import onnx_signature
from exporter.onnx.export import export_onnx, model_in_precision
from exporter.pipeline.validate import validate_stage
from exporter.model.prompts import left_padded
from exporter.pipeline.settings import ValidateSettings
from exporter.recipe import Atol, Recipe
from exporter.model.surgery import apply_skip


def check_half_parity(model, mask, precision, graph, batches, steps, atol, folder):
    """validate_stage on one half graph against the masked fp32 reference recorded on `batches`."""
    from exporter.checks.reference import REFERENCE_FILE, save_reference
    from exporter.pipeline.reference import record_reference

    save_reference(record_reference(model, mask, batches, steps), folder / REFERENCE_FILE)
    out = validate_stage(ValidateSettings(decode_steps=steps, atol=Atol(), half_atol=atol), folder, {precision: graph},
                         "fp32")
    return out.parity, out.not_run, out.greedy


def _elem_types(path):
    """value name -> ONNX element type, for every typed value in the graph (inputs, outputs, intermediates)."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    values = list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    return proto, types


@pytest.fixture(scope="module")
def fp16_graphs(tiny_models, tmp_path_factory):
    """llama (GQA, llama3 rope) and qwen3 (q/k norms) with attention skipped in layers 1-2, in fp16."""
    out = {}
    for arch in ("llama", "qwen3"):
        model, _ = tiny_models[arch]
        half = model_in_precision(model, "fp16")
        assert next(model.parameters()).dtype != next(half.parameters()).dtype  # the original is untouched
        out[arch] = export_onnx(apply_skip(half, make_mask("attention")), tmp_path_factory.mktemp(arch))
    return out


def test_fp16_graph_keeps_fragile_parts_in_fp32(fp16_graphs):
    for arch, path in fp16_graphs.items():
        sig = onnx_signature(path)
        assert sig["outputs"]["logits"]["dtype"] == "float"
        assert sig["inputs"]["past_key_values.0.key"]["dtype"] == "float16"
        assert sig["outputs"]["present.3.value"]["dtype"] == "float16"
        proto, types = _elem_types(path)
        ops = {}
        for node in proto.graph.node:
            ops.setdefault(node.op_type, []).append(node)
        # softmax over fp32 scores; RMSNorm variance (Pow -> ReduceMean) on fp32 activations
        assert ops["Softmax"] and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in ops["Softmax"]), arch
        assert ops["ReduceMean"] and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in ops["ReduceMean"]), arch
        # the weights themselves are half: most initializer bytes are fp16
        halves = sum(1 for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
        assert halves > len(proto.graph.initializer) // 2, arch


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp16_parity_in_ort_against_fp32_reference_with_left_padding(tiny_models, fp16_graphs, arch, tmp_path):
    model, tok = tiny_models[arch]
    mask = make_mask("attention")
    ids, attn = left_padded(tok, PROMPTS)
    batches = [(ids[:1], attn[:1]), (ids, attn)]
    parity, not_run, greedy = check_half_parity(model, mask, "fp16", fp16_graphs[arch], batches, 8,
                                                Atol(prefill=2e-2, decode=2e-2), tmp_path)
    assert not not_run
    assert len(parity) == 4  # prefill and decode, batch 1 and 2
    for p in parity:
        assert p["artifact"] == "onnx:fp16"
        # a NaN from a fully masked padding row would fail here (NaN <= atol is false)
        assert p["passed"] and p["max_abs_diff"] <= 2e-2, p
        assert p["max_abs_diff"] > 0  # it really is a different precision from the reference
    assert greedy["fp16"]["tokens"] == 9


def test_bf16_graph_is_marked_not_run_with_the_op_when_ort_cpu_lacks_kernels(tiny_models, tmp_path):
    model, tok = tiny_models["llama"]
    mask = make_mask("attention")
    path = export_onnx(apply_skip(model_in_precision(model, "bf16"), mask), tmp_path)
    ids, attn = left_padded(tok, PROMPTS[:1])
    parity, not_run, greedy = check_half_parity(model, mask, "bf16", path, [(ids, attn)], 4,
                                                Atol(prefill=0.5, decode=0.5), tmp_path)
    if not_run:  # ORT 1.32's CPU provider: no bf16 kernel for Where (and more)
        assert parity == [] and greedy == {}
        assert not_run[0]["check"] == "onnx:bf16 parity in ONNX Runtime (CPU)"
        assert "no kernel for" in not_run[0]["reason"] and " node " in not_run[0]["reason"]
    else:  # a later ORT that runs bf16 on CPU: then the check must really pass
        assert parity and all(p["passed"] for p in parity)


def test_ort_unsupported_op_names_the_op_and_node():
    err = RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                       "Where(16) node with name 'node_where'")
    assert ort_unsupported_op(err) == "Where(16) node node_where"
    assert ort_unsupported_op(RuntimeError("something else")) is None


def test_precision_of_and_recipe_precisions():
    import torch

    assert [precision_of(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == ["fp32", "fp16", "bf16"]
    base = {"version": 1, "model": {"config": {"model_type": "llama"}}}
    assert Recipe.model_validate(base).precisions == ["fp32"]
    assert Recipe.model_validate({**base, "model": {"config": {"model_type": "llama"}, "dtype": "bfloat16"}}).precisions == ["bf16"]
    r = Recipe.model_validate({**base, "export": {"precisions": ["fp32", "fp16", "fp16"]}, "tensorrt": {}})
    assert r.precisions == ["fp32", "fp16"] and r.engine_precisions == ["fp32", "fp16"]


def test_recipe_rejects_unknown_precision_and_engines_from_unexported_graphs(tmp_path):
    from exporter.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel: {config: {model_type: llama}}\nexport: {precisions: [fp8]}\n")
    with pytest.raises(UserError, match=r"export\.precisions\[0\]"):
        load_recipe(path)
    path.write_text("version: 1\nmodel: {config: {model_type: llama}}\ntensorrt: {precisions: [fp16]}\n")
    with pytest.raises(UserError, match=r"tensorrt.precisions \['fp16'\] are not exported"):
        load_recipe(path)
