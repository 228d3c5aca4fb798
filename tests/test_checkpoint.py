"""The Nemotron-NAS / DeciLM serving checkpoint: what it holds, and loading it back gives the same logits."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import PROMPTS
from exporter.model.checkpoint import WEIGHTS, block_configs, merge_removed, write_checkpoint
from exporter.errors import UserError
from exporter.model.source import load_config, load_model
from exporter.model.prompts import left_padded
from exporter.recipe import ModelSource
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.mask import SkipMask
from exporter.model.surgery import apply_skip, masked

MASK = SkipMask(attention=(1, 2), mlp=(2,))  # layer 2 loses its whole block


@pytest.fixture(scope="module")
def written(tiny_models, tmp_path_factory):
    model, tok = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    files = write_checkpoint(model, apply_skip(model, MASK), MASK, folder, tok)
    return model, folder, files


def test_checkpoint_holds_only_kept_weights_and_deci_block_configs(written):
    model, folder, files = written
    assert folder / WEIGHTS in files and folder / "config.json" in files
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert keys == set(apply_skip(model, MASK).state_dict())
    assert not [k for k in keys if k.startswith(("model.layers.1.self_attn.", "model.layers.2.self_attn.",
                                                 "model.layers.2.mlp.", "model.layers.1.input_layernorm"))]
    assert "model.layers.1.mlp.down_proj.weight" in keys and "model.layers.3.self_attn.o_proj.weight" in keys
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, True, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False]
    assert blocks[0]["attention"]["n_heads_in_group"] == 2  # 4 heads, 2 KV heads
    assert blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "intermediate_size": 96}


def test_ffn_mult_is_written_when_it_reproduces_the_width():
    class Config:  # SmolLM2-135M's shape: 576 hidden, 1536 intermediate -> ffn_mult 4.0
        hidden_size, intermediate_size, num_hidden_layers = 576, 1536, 2
        num_attention_heads, num_key_value_heads = 9, 3

    blocks = block_configs(Config, SkipMask(attention=(1,)))
    assert blocks[0]["ffn"]["ffn_mult"] == 4.0 and blocks[0]["attention"]["n_heads_in_group"] == 3
    assert blocks[1]["attention"] == {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}


def test_round_trip_gives_the_same_logits(written):
    model, folder, _ = written
    source = ModelSource(path=folder)
    config = load_config(source)
    assert config.model_type == "llama" and config.num_hidden_layers == 4
    assert merge_removed(SkipMask(), config) == MASK
    loaded, _ = load_model(source)
    ids, attn = left_padded(ByteTok(), PROMPTS)
    with masked(model, MASK):
        expected = HFRunner(model).prefill(ids, attn)
    valid = attn.bool()
    # the loaded HF model, unmasked (removed sub-layers output exactly zero), and its skipped export graph
    for runner in (HFRunner(loaded), TorchRunner(apply_skip(loaded, MASK))):
        got = runner.prefill(ids, attn)
        assert torch.equal(got.argmax(-1)[valid], expected.argmax(-1)[valid])
        assert float((got - expected).abs()[valid].max()) <= 1e-5


class ByteTok:
    def encode(self, text):
        return [b % 256 for b in text.encode()]


def test_unsupported_architecture_is_a_one_line_user_error(tiny_models, tmp_path):
    model, tok = tiny_models["qwen3"]
    with pytest.raises(UserError, match="Llama blocks only; qwen3"):
        write_checkpoint(model, apply_skip(model, MASK), MASK, tmp_path / "c", tok)
