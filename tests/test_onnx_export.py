"""ONNX export under the contract, and parity in ONNX Runtime against the masked PyTorch model."""

import onnx
import pytest

from conftest import CONFIGS, MASKS, PROMPTS, make_mask
from exporter.onnx.contract import onnx_signature
from exporter.onnx.export import export_onnx
from exporter.onnx.graph import onnx_weight_elements
from exporter.checks.parity import check_parity
from exporter.model.prompts import left_padded
from exporter.backends.ort import OrtRunner
from exporter.backends.pytorch import HFRunner
from exporter.mask import SkipMask
from exporter.model.surgery import apply_skip, count_parameters, masked


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_onnx_parity_prefill_and_decode_with_left_padding(tiny_models, tmp_path, arch, mask_name):
    model, tok = tiny_models[arch]
    mask = make_mask(mask_name)
    skipped = apply_skip(model, mask)
    path = export_onnx(skipped, tmp_path)
    onnx.checker.check_model(str(path), full_check=True)

    sig = onnx_signature(path)
    kept = [i for i in range(4) if i not in mask.attention]
    expected_inputs = ["input_ids", "attention_mask", "position_ids"]
    expected_outputs = ["logits"]
    for i in kept:
        expected_inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        expected_outputs += [f"present.{i}.key", f"present.{i}.value"]
    assert list(sig["inputs"]) == expected_inputs
    assert list(sig["outputs"]) == expected_outputs
    assert sig["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert sig["inputs"]["attention_mask"]["shape"] == ["batch", "total_sequence"]
    for i in kept:
        assert sig["inputs"][f"past_key_values.{i}.key"]["shape"][::2] == ["batch", "past_sequence"]
        assert sig["outputs"][f"present.{i}.value"]["shape"][::2] == ["batch", "total_sequence"]
    assert onnx_weight_elements(path) <= count_parameters(skipped) + 4096

    ids, attn = left_padded(tok, PROMPTS)  # batch 2, left-padded, longer than mistral's window
    for rows in (slice(0, 1), slice(0, 2)):
        with masked(model, mask):
            phases, _ = check_parity(HFRunner(model), OrtRunner(path), ids[rows], attn[rows], 16, 1e-4, 1e-4, "onnx")
        for p in phases:
            assert p.greedy_match and p.max_abs_diff <= 1e-4, p


def test_graph_without_any_attention_keeps_the_contract_inputs(tiny_models, tmp_path):
    """With every attention skipped the mask and positions are unused, but the contract keeps them."""
    model, tok = tiny_models["llama"]
    mask = SkipMask(attention=(0, 1, 2, 3))
    path = export_onnx(apply_skip(model, mask), tmp_path)
    sig = onnx_signature(path)
    assert list(sig["inputs"]) == ["input_ids", "attention_mask", "position_ids"]
    assert list(sig["outputs"]) == ["logits"]
    ids, attn = left_padded(tok, PROMPTS)
    with masked(model, mask):
        phases, _ = check_parity(HFRunner(model), OrtRunner(path), ids, attn, 4, 1e-4, 1e-4, "onnx")
    assert all(p.passed for p in phases)


def test_removed_weights_are_not_in_the_graph(tiny_models, tmp_path):
    """A graph of the full model holds more weight elements than the skipped one by the removed modules."""
    model, _ = tiny_models["qwen3"]
    full = onnx_weight_elements(export_onnx(apply_skip(model, SkipMask()), tmp_path / "full"))
    mask = make_mask("both")
    skipped = onnx_weight_elements(export_onnx(apply_skip(model, mask), tmp_path / "skipped"))
    removed = count_parameters(model) - count_parameters(apply_skip(model, mask))
    assert abs((full - skipped) - removed) <= 4096
