import pytest
import torch

from conftest import CONFIGS, MASKS, PROMPTS, make_mask
from exporter.architectures import layout_for
from exporter.errors import UserError
from exporter.checks.parity import check_parity
from exporter.pipeline.remove import removed_parameters
from exporter.model.prompts import left_padded
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.mask import SkipMask
from exporter.model.surgery import apply_skip, count_parameters, masked


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_removed_modules_and_weights_are_gone(tiny_models, arch, mask_name):
    model, _ = tiny_models[arch]
    mask = make_mask(mask_name)
    layout = layout_for(model.config.model_type)
    skipped = apply_skip(model, mask)
    keys = set(skipped.state_dict())
    for i, layer in enumerate(skipped.model.layers):
        attn_gone, mlp_gone = i in mask.attention, i in mask.mlp
        assert hasattr(layer, layout.attention) is not attn_gone
        assert hasattr(layer, layout.attention_norm) is not attn_gone
        assert hasattr(layer, layout.mlp) is not mlp_gone
        assert hasattr(layer, layout.mlp_norm) is not mlp_gone
        assert any(k.startswith(f"model.layers.{i}.{layout.attention}.") for k in keys) is not attn_gone
        assert any(k.startswith(f"model.layers.{i}.{layout.mlp}.") for k in keys) is not mlp_gone
    # kept weights keep the base model's names (original layer index)
    assert keys <= set(model.state_dict())
    assert skipped.kept_attention == [i for i in range(4) if i not in mask.attention]


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_parameter_count_drops_by_exactly_the_removed_modules(tiny_models, arch, mask_name):
    model, _ = tiny_models[arch]
    mask = make_mask(mask_name)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * head_dim
    q = cfg.num_attention_heads * head_dim
    # computed from the config, independently of the modules
    attn = h * q + 2 * h * kv + q * h + h  # q, k, v, o projections + input norm
    attn += {"qwen2": q + 2 * kv, "qwen3": q + 2 * kv + h + 2 * head_dim}.get(arch, 0)  # biases, q/k norms
    mlp = 3 * h * cfg.intermediate_size + h  # gate, up, down + post-attention norm
    mlp += 2 * cfg.intermediate_size + h if arch == "llama" else 0  # mlp_bias
    expected = attn * len(mask.attention) + mlp * len(mask.mlp)
    skipped = apply_skip(model, mask)
    assert count_parameters(model) - count_parameters(skipped) == expected == removed_parameters(model, mask)


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_skipped_model_matches_masked_reference(tiny_models, arch, mask_name):
    model, tok = tiny_models[arch]
    mask = make_mask(mask_name)
    ids, attn = left_padded(tok, PROMPTS)
    assert not attn.all()  # the batch really is left-padded
    with masked(model, mask):
        phases, _ = check_parity(HFRunner(model), TorchRunner(apply_skip(model, mask)), ids, attn, 8, 1e-4, 1e-4, "t")
    for p in phases:
        assert p.passed, p
        assert p.max_abs_diff <= 1e-4


def test_mask_changes_the_output(tiny_models):
    """The reference really masks: skipping attention changes the logits."""
    model, tok = tiny_models["llama"]
    ids, attn = left_padded(tok, PROMPTS[:1])
    full = HFRunner(model).prefill(ids, attn)
    with masked(model, SkipMask(attention=(1,))):
        skipped = HFRunner(model).prefill(ids, attn)
    assert (full - skipped).abs().max() > 1e-3
    assert torch.equal(full, HFRunner(model).prefill(ids, attn))  # hooks removed afterwards


def test_out_of_range_mask_is_a_user_error(tiny_models):
    model, _ = tiny_models["llama"]
    with pytest.raises(UserError, match="has 4 layers"):
        apply_skip(model, SkipMask(attention=(4,)))


def test_unsupported_architecture_is_refused():
    from exporter.model.source import load_model
    from exporter.recipe import ModelSource

    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        load_model(ModelSource(config={"model_type": "gpt2", "n_layer": 2}))
