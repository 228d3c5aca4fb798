"""onnxruntime-genai drives the skipped ONNX unchanged: its greedy tokens equal the masked PyTorch model's.

Needs the optional extra `[genai]` (onnxruntime-genai==0.18.0); skipped with the reason otherwise.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS
from exporter.backends.genai import CONFIG_FILE, genai_greedy, write_genai_config
from exporter.onnx.export import export_onnx
from exporter.onnx.contract import OPT_FILE
from exporter.onnx.optimize import optimize_onnx
from exporter.checks.parity import greedy_tokens
from exporter.backends.pytorch import HFRunner
from exporter.mask import SkipMask
from exporter.model.surgery import apply_skip, masked

ROOT = Path(__file__).resolve().parents[1]


def _og():
    return pytest.importorskip("onnxruntime_genai", reason="optional extra [genai] not installed: "
                                                          "pip install -e '.[genai]' (onnxruntime-genai==0.18.0)")


def torch_greedy(model, mask, ids: list[int], new_tokens: int, eos) -> list[int]:
    """The masked reference's greedy continuation, cut after the first eos (where genai stops too)."""
    t = torch.tensor([ids])
    with masked(model, mask):
        tokens = greedy_tokens(HFRunner(model), t, torch.ones_like(t), new_tokens - 1)[0]
    stops = set(eos) if isinstance(eos, list) else {eos}
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def genai_folder(model, mask, folder, graph: str) -> dict:
    """The skipped model's ONNX in `folder` (optimized when `graph` is OPT_FILE) with a genai_config.json
    naming `graph`; returns the config's model section."""
    export_onnx(apply_skip(model, mask), folder)
    if graph == OPT_FILE:
        assert optimize_onnx(folder / "model.onnx", model.config)["batch1_unpacked_matmuls"] > 0
    write_genai_config(model.config, model.generation_config, folder, graph, 256)
    return json.loads((folder / CONFIG_FILE).read_text())["model"]


def test_genai_config_keeps_base_layer_numbering(tiny_models, tmp_path):
    model, _ = tiny_models["qwen3"]
    path = write_genai_config(model.config, model.generation_config, tmp_path, "model.onnx", 256)
    config = json.loads(path.read_text())
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 4 and decoder["head_size"] == 32  # qwen3's head_dim != hidden/heads
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["type"] == "qwen3"


@pytest.mark.parametrize("graph", ["model.onnx", OPT_FILE])
@pytest.mark.parametrize("arch,mask", [("llama", SkipMask(attention=(1, 2), mlp=(2,))),
                                       ("qwen2", SkipMask(attention=(0, 3)))])
def test_genai_greedy_equals_masked_pytorch_on_tiny_models(tiny_models, tmp_path, arch, mask, graph):
    """Both graphs: the pipeline points genai_config.json at the optimized one (its decode steps take the
    batch-1 branch) and keeps the plain one for everything else."""
    _og()
    model, tok = tiny_models[arch]
    eos = genai_folder(model, mask, tmp_path, graph)["eos_token_id"]
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert genai_greedy(tmp_path, ids, 24) == torch_greedy(model, mask, ids, 24, eos)


@pytest.mark.slow
@pytest.mark.real_weights
def test_genai_greedy_text_equals_pytorch_on_smollm2(tmp_path):
    """The bar: SmolLM2-135M, default mask, 3 chat prompts, 32 new tokens, identical tokens and text."""
    og = _og()
    pytest.importorskip("gguf")
    from exporter.model import prompts as P
    from exporter.pipeline.run import run
    from exporter.mask import resolve_mask
    from exporter.recipe import load_recipe
    from exporter.model.source import load_model

    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    out = tmp_path / "smollm2-135m"
    assert run(recipe, out)["passed"]
    model, tok = load_model(recipe.model)
    mask = resolve_mask(recipe, model.config.num_hidden_layers)
    assert mask.attention == (9, 25, 26, 28)
    eos = json.loads((out / CONFIG_FILE).read_text())["model"]["eos_token_id"]
    og_tok = og.Tokenizer(og.Model(str(out)))
    prompts = ["What is the capital of France?", "Name a primary colour.", "Write a haiku about the sea."]
    for prompt in prompts:
        ids = P.encode(tok, prompt, chat=True)
        expected = torch_greedy(model, mask, ids, 32, eos)
        got = genai_greedy(out, ids, 32)
        assert got == expected, (prompt, tok.decode(got), tok.decode(expected))
        # genai's own tokenizer, read from the artifact's tokenizer files, gives the same text
        assert og_tok.decode(got) == tok.decode(got, skip_special_tokens=True)
        print(f"{prompt!r}: {P.decode(tok, got)!r}")


def test_genai_second_turn_after_rewind_equals_masked_pytorch(tiny_models, tmp_path):
    """A chat's next turn: onnxruntime-genai 0.18.0's append_tokens after generated tokens fails with
    past_present_share_buffer false (the builder's own graph too; docs/serving.md), so a turn rewinds and
    appends the whole history. That recomputes the prefix and must give the masked model's tokens."""
    og = _og()
    model, tok = tiny_models["llama"]
    mask = SkipMask(attention=(1, 2), mlp=(2,))
    eos = genai_folder(model, mask, tmp_path, OPT_FILE)["eos_token_id"]
    m = og.Model(str(tmp_path))
    params = og.GeneratorParams(m)
    params.set_search_options(do_sample=False, max_length=200)
    generator = og.Generator(m, params)
    history: list[int] = []
    for turn in PROMPTS:
        history += tok.encode(turn)
        generator.rewind_to(0)
        generator.append_tokens(history)
        got = []
        while not generator.is_done() and len(got) < 10:
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        assert got == torch_greedy(model, mask, history, 10, eos)
        history += got


@pytest.mark.parametrize("graph", ["model.onnx", OPT_FILE])
def test_genai_batch_of_two_prompts_equals_each_alone(tiny_models, tmp_path, graph):
    """onnxruntime-genai right-pads a batch, so once decoding starts a short row's mask has a hole and its
    positions skip the padding. Each row's decode logits must be the masked PyTorch model's for that
    prompt alone (logits, not just tokens: tiny random models' greedy tokens hide small errors). The
    optimized graph's first version (rotary at cache slots) was 5e-3 off here, and gave SmolLM2 wrong tokens."""
    import numpy as np

    og = _og()
    model, tok = tiny_models["llama"]
    mask = SkipMask(attention=(1, 2), mlp=(2,))
    pad = genai_folder(model, mask, tmp_path, graph)["pad_token_id"]
    rows = [tok.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1 and pad not in sum(rows, [])
    width = max(len(r) for r in rows)
    m = og.Model(str(tmp_path))
    params = og.GeneratorParams(m)
    params.set_search_options(do_sample=False, max_length=width + 8, batch_size=len(rows))
    generator = og.Generator(m, params)
    generator.append_tokens(np.array([r + [pad] * (width - len(r)) for r in rows], dtype=np.int32))
    histories = [list(r) for r in rows]
    worst = 0.0
    for step in range(6):
        generator.generate_next_token()
        if step:  # from the second token on, the logits are a one-token decode step's, [batch, 1, vocab]
            logits = np.asarray(generator.get_output("logits"))[:, -1]
            for b, history in enumerate(histories):
                with masked(model, mask), torch.no_grad():
                    expected = model(torch.tensor([history])).logits[0, -1].numpy()
                worst = max(worst, float(np.abs(logits[b] - expected).max()))
        for b, token in enumerate(generator.get_next_tokens()):
            histories[b].append(int(token))
    assert worst < 1e-3, worst
