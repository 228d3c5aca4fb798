"""The cost model against the real models: parameter counts, KV bytes, windows, shipped configs, `plan`."""

import json

import pytest

from conftest import CONFIGS, MASKS, make_mask
from exporter import cost
from exporter.mask import SkipMask
from exporter.model.source import config_from_json
from exporter.model.surgery import apply_skip, count_parameters
from helpers import ROOT, TINY_RECIPE, cli


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_kept_parameters_match_the_skipped_model(tiny_models, arch, mask_name):
    model, _ = tiny_models[arch]
    mask = make_mask(mask_name)
    # counted from the config alone, checked against the physically skipped torch model
    assert cost.kept_parameters(model.config, mask) == count_parameters(apply_skip(model, mask))
    assert cost.kept_parameters(model.config, None) == count_parameters(model)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kv_bytes_match_the_skipped_models_cache(tiny_models, arch):
    import torch

    from exporter.backends.pytorch import TorchRunner

    model, _ = tiny_models[arch]
    mask = make_mask("attention")
    runner = TorchRunner(apply_skip(model, mask))
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    runner.prefill(ids, torch.ones_like(ids))
    cache_bytes = sum(t.numel() * t.element_size() for t in runner.past)  # 7 tokens in the cache
    assert cost.kv_bytes_per_token(model.config, mask) * 7 == cache_bytes
    if arch in ("llama", "qwen3"):  # no sliding window: every cached token is read (windows: see below)
        assert cost.decode_bytes(model.config, mask, context=7)["kv_read"] == cache_bytes


def test_empty_mask_predicts_no_speedup(tiny_models):
    config = tiny_models["llama"][0].config
    assert cost.predicted_decode_speedup(config, SkipMask(), 512) == 1.0
    assert cost.predicted_prefill_speedup(config, SkipMask(), 128) == 1.0


def test_more_skipped_attention_predicts_more_speedup_and_longer_context_helps(tiny_models):
    config = tiny_models["llama"][0].config
    one, two = SkipMask(attention=(1,)), SkipMask(attention=(1, 2))
    assert 1.0 < cost.predicted_decode_speedup(config, one, 512) < cost.predicted_decode_speedup(config, two, 512)
    # the KV cache grows with the context, and a skipped attention layer reads none of it
    assert cost.predicted_decode_speedup(config, one, 128) < cost.predicted_decode_speedup(config, one, 2048)
    assert cost.predicted_saving(cost.predicted_decode_speedup(config, one, 512)) == pytest.approx(
        1 - cost.decode_bytes(config, one, 512)["total"] / cost.decode_bytes(config, None, 512)["total"])


def test_sliding_window_caps_the_kv_read(tiny_models):
    config = tiny_models["mistral"][0].config  # sliding_window 5
    assert cost.decode_bytes(config, None, 100)["kv_read"] == cost.decode_bytes(config, None, 5)["kv_read"]
    assert cost.decode_bytes(config, None, 4)["kv_read"] < cost.decode_bytes(config, None, 5)["kv_read"]


def test_half_precision_halves_the_bytes(tiny_models):
    config = tiny_models["qwen3"][0].config
    mask = make_mask("both")
    assert cost.decode_bytes(config, mask, 64, precision="float32")["total"] == \
        2 * cost.decode_bytes(config, mask, 64, precision="bfloat16")["total"]


def test_prefill_flops_are_twice_the_matmul_weights_plus_attention(tiny_models):
    config = tiny_models["llama"][0].config
    flops = cost.prefill_flops_per_token(config, None, tokens=1)
    s = cost.layer_sizes(config)
    assert flops["projections"] == 2 * config.num_hidden_layers * (s.attention + s.mlp)
    h, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    assert flops["attention_scores"] == 4 * h * d * 1 * config.num_hidden_layers


def test_shipped_mistral_config_gives_the_public_parameter_count():
    config = config_from_json(ROOT / "recipes" / "configs" / "mistral-7b-v0.1.json")
    assert cost.kept_parameters(config, None) == 7_241_732_096  # Mistral-7B-v0.1's published size
    mask = SkipMask(attention=tuple(range(21, 31)))
    assert cost.kv_bytes_per_token(config, mask, "bfloat16") == 22 * 2 * 8 * 128 * 2


def test_mask_out_of_range_is_a_user_error(tiny_models):
    from exporter.errors import UserError

    with pytest.raises(UserError, match="layer"):
        cost.decode_bytes(tiny_models["llama"][0].config, SkipMask(attention=(9,)), 16)


def test_plan_mistral_offline_from_the_shipped_config():
    result = cli("plan", ROOT / "recipes" / "mistral.yaml", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "mistral-7b-v0.1.json" in out["config_from"]
    assert out["mask"]["attention"] == list(range(21, 31))
    pred = out["prediction"]
    assert pred["attention_layers_kept"] == 22 and pred["kv_reduction"] == pytest.approx(10 / 32, abs=1e-4)
    decode = {(d["batch"], d["context"]): d for d in pred["decode"]}
    assert 1.0 < decode[(1, 512)]["speedup"] < decode[(1, 2048)]["speedup"]


def test_plan_bad_config_path_is_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    result = cli("plan", TINY_RECIPE, "--config", bad, timeout=120)
    assert result.returncode == 2 and "lacks" in result.stderr and "Traceback" not in result.stderr
