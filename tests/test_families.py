"""The model families beyond Llama (Gemma 2/3, Phi-3, Granite, OLMo 2, SmolLM3) and held-out variants of the four
older ones: each family's twist through removal, parity, export, the optimized graph, the cost model, genai and the
serving checkpoint.

Every model here is a tiny random one saved with `save_pretrained` into a folder without tokenizer files (as a user
would bring it), loaded back by `exporter.model.source.load_model`. Weights are drawn with std 0.15 and every norm weight
is randomised, so a wrong norm, multiplier or rotary shows far above the 1e-4 tolerance (test_twist_matters checks
that each twist moves the logits). The reference is Hugging Face's own model run by its own code with the skipped
branches' contributions zeroed by forward hooks (`surgery.masked`), never our surgery. The whole pipeline per family
(fp16, tensorrt-rtx engines, genai runtime, with and without tokenizer files) is the `slow` test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import cli
from exporter.architectures import ARCHITECTURES
from exporter.backends.ort import OrtRunner
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.errors import UserError
from exporter.mask import SkipMask
from exporter.model.source import load_model
from exporter.checks.parity import check_parity
from exporter.model.prompts import ByteTokenizer, left_padded
from exporter.recipe import ModelSource
from exporter.model.surgery import apply_skip, count_parameters, masked

ATOL = 1e-4
STEPS = 10
PROMPTS = ["The capital of France is", "Hi there"]  # 24 and 8 byte tokens: batch 2, left-padded

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 28,
             "partial_rotary_factor": 0.5,  # 8 of 16 dims rotate: 4 frequencies
             "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [2.0, 3.1, 4.5, 6.0]}

# Held-out tiny configs (not tests/conftest.py's). Windows (4-5) are shorter than the sequence (24 + 10 tokens);
# caps bind; multipliers are not 1; SmolLM3's layers 1 and 3 have no rotary (1 is masked below, 3 is kept).
FAMILIES = {
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
                   attn_logit_softcapping=1.5, final_logit_softcapping=2.0),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=2.0,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "phi3": dict(model_type="phi3", sliding_window=5),  # Phi-3-mini-4k's shape: full rotary, a window
    # Phi-4-mini's shape: partial rotary and longrope; 28 original positions: decode crosses to the long factors
    "phi3_longrope": dict(model_type="phi3", original_max_position_embeddings=28, rope_parameters=_LONGROPE),
    "granite": dict(model_type="granite", embedding_multiplier=2.5, residual_multiplier=0.4,
                    attention_multiplier=0.3, logits_scaling=1.7, attention_bias=True, mlp_bias=True),
    "olmo2": dict(model_type="olmo2"),
    "smollm3": dict(model_type="smollm3", no_rope_layers=[1, 0, 1, 0], use_sliding_window=True, sliding_window=4),
}
NEW = ["gemma2", "gemma3_text", "phi3", "phi3_longrope", "granite", "olmo2", "smollm3"]
OLD = ["llama", "mistral", "qwen2", "qwen3"]

# attention in layers 1 and 2 (a sliding and a full layer for the alternating families), the MLP of layer 2
MASK = SkipMask(attention=(1, 2), mlp=(2,))
MASKS = {"none": SkipMask(), "attention": SkipMask(attention=(1, 2)), "mlp": SkipMask(mlp=(0, 3)), "both": MASK}

# Each twist, and the config change that turns it off (it must move the masked model's logits).
TWISTS = {
    "mistral": {"sliding window": dict(sliding_window=4096)},
    "qwen2": {"sliding window": dict(sliding_window=4096)},
    "gemma2": {"attention soft-capping": dict(attn_logit_softcapping=None),
               "final soft-capping": dict(final_logit_softcapping=None),
               "sliding window": dict(sliding_window=4096), "query_pre_attn_scalar": dict(query_pre_attn_scalar=16)},
    "gemma3_text": {"local rotary base": dict(rope_parameters={
                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
                    "final soft-capping": dict(final_logit_softcapping=None), "sliding window": dict(sliding_window=4096)},
    "phi3": {"sliding window": dict(sliding_window=None)},
    "phi3_longrope": {"longrope, partial rotary": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})},
    "granite": {"embedding multiplier": dict(embedding_multiplier=1.0),
                "residual multiplier": dict(residual_multiplier=1.0),
                "attention multiplier": dict(attention_multiplier=0.25), "logits scaling": dict(logits_scaling=1.0)},
    "smollm3": {"no-rope layers": dict(no_rope_layers=[1, 1, 1, 1]), "sliding window": dict(use_sliding_window=False)},
}

# What the optimized graph does per family: None = written and checked; else the reason it is refused.
NOT_OPTIMIZED = {"phi3_longrope": "longrope"}
# Why the Nemotron-NAS / DeciLM checkpoint is refused (None: it is written).
CHECKPOINT_REFUSED = {"llama": None, "mistral": "sliding_window=4", "qwen2": "biases", "qwen3": "q/k norms",
                      "gemma2": "sandwich norms", "gemma3_text": "sandwich norms", "phi3": "fused",
                      "phi3_longrope": "fused", "granite": "multipliers", "olmo2": "post-norms",
                      "smollm3": "no rotary embedding"}


def config_of(family: str, **override) -> dict:
    return {**COMMON, **FAMILIES[family], **override}


def build(family: str, **override):
    """A random model of the family (seed 0), every norm weight randomised (std 0.2)."""
    model, _ = load_model(ModelSource(config=config_of(family, **override), seed=0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a saved model folder without tokenizer files, made on first use."""
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(family) / "model"
            build(family).save_pretrained(folder)
            made[family] = folder
        return made[family]

    return get


@pytest.fixture(scope="module")
def loaded(folders):
    """family -> (model, tokenizer) loaded from its folder, as the pipeline loads it."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(ModelSource(path=folders(family)))
        return cache[family]

    return get


def batch(tokenizer):
    ids, attn = left_padded(tokenizer, PROMPTS)
    assert attn[1, 0] == 0 and attn[0].all()  # row 1 is left-padded
    return ids, attn


def reference_parity(model, mask, candidate, ids, attn):
    """Prefill and STEPS teacher-forced decode steps of `candidate` against the masked Hugging Face model."""
    with masked(model, mask):
        phases, _ = check_parity(HFRunner(model), candidate, ids, attn, STEPS, ATOL, ATOL, "candidate")
    return phases


def assert_passed(phases):
    assert [p.phase for p in phases] == ["prefill", "decode"] and phases[1].steps == STEPS
    for p in phases:
        assert p.passed, f"{p.phase}: max|Δ| {p.max_abs_diff:.2e} (atol {ATOL}), mismatches {p.mismatches}"


# ------------------------------------------------------------------------------------------- the table


def test_every_family_is_in_the_table():
    assert {FAMILIES[f]["model_type"] for f in FAMILIES} == set(ARCHITECTURES)


# ------------------------------------------------------------------------------------------- the twists bind


@pytest.mark.parametrize("family,twist", [(f, t) for f, twists in TWISTS.items() for t in twists])
def test_twist_matters(family, twist):
    """Turning a twist off moves the masked model's logits far beyond the tolerance: the tests below would see it."""
    model = build(family)
    other = build(family, **TWISTS[family][twist])
    other.load_state_dict(model.state_dict())
    ids, attn = batch(ByteTokenizer(256))
    outs = []
    for m in (model, other):
        with masked(m, MASK), torch.no_grad():
            outs.append(m(input_ids=ids, attention_mask=attn).logits)
    diff = float((outs[0] - outs[1]).abs()[attn.bool()].max())
    assert diff > 1e-2, f"{family}: turning off {twist} changed the logits by only {diff:.1e}"


def test_soft_caps_bind():
    """Gemma 2's caps are reached: some scaled scores exceed the attention cap and the raw logits the final cap."""
    model = build("gemma2")
    skipped = apply_skip(model, SkipMask())
    ids, attn = batch(ByteTokenizer(256))
    with torch.no_grad():
        h, ctx = skipped.embed(ids, attn)
        layer = skipped.model.layers[0]
        attn_mod = getattr(layer, layer.layout.attention)
        x = layer.input_layernorm(h)
        q = attn_mod.q_proj(x).view(2, -1, 4, 16).transpose(1, 2)
        k = attn_mod.k_proj(x).view(2, -1, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2)) * layer.scaling
        raw_logits = skipped.lm_head(skipped.model.norm(skipped.run_layers(h, ctx)[0]))
    assert float(scores.abs().max()) > 1.5 and float(raw_logits.abs().max()) > 2.0


# ------------------------------------------------------------------------------------------- removal and the reference


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_skipped_model_matches_masked_reference(family, mask, loaded):
    """The physically skipped model (PyTorch) against Hugging Face's own model with the branches zeroed."""
    model, tokenizer = loaded(family)
    skip = MASKS[mask]
    assert_passed(reference_parity(model, skip, TorchRunner(apply_skip(model, skip)), *batch(tokenizer)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removal_takes_whole_branches_and_the_cost_model_counts_them(family, loaded, folders):
    """Removed parameters = the branches' modules (pre-norm, module, post-norm); the cost model's count of kept
    parameters (from the config object and from config.json alone) is exact."""
    from exporter.cost import kept_parameters
    from exporter.model.source import config_from_json
    from exporter.pipeline.remove import remove_stage

    model, _ = loaded(family)
    skipped, removed = remove_stage(model, MASK)
    assert removed.checks[0]["passed"], removed.checks
    assert removed.kv_cache["layers_skipped"] == 2
    layout = ARCHITECTURES[model.config.model_type]
    for i in MASK.attention:
        assert not any(hasattr(skipped.model.layers[i], name) for name in layout.branch("attention"))
    json_config = config_from_json(folders(family) / "config.json")
    for config in (model.config, json_config):
        assert kept_parameters(config, MASK) == count_parameters(skipped)
        assert kept_parameters(config, None) == count_parameters(model)


def test_masked_reference_zeroes_the_whole_sandwich_branch():
    """A post-norm whose output on zeros is not zero (a LayerNorm with a bias in place of Gemma 2's post-attention
    norm): zeroing the attention module's output would leave the bias in the residual stream; the reference hooks
    the post-norm, so it agrees with the physically removed branch."""
    model = build("gemma2")
    post = torch.nn.LayerNorm(64)
    with torch.no_grad():
        post.bias.normal_(0, 0.5)
    model.model.layers[1].post_attention_layernorm = post
    skip = SkipMask(attention=(1,))
    ids, attn = batch(ByteTokenizer(256))
    assert_passed(reference_parity(model, skip, TorchRunner(apply_skip(model, skip)), ids, attn))
    # the naive hook (the attention module's output only) is measurably different
    handle = model.model.layers[1].self_attn.register_forward_hook(
        lambda _m, _i, out: (torch.zeros_like(out[0]), *out[1:]))
    try:
        with torch.no_grad():
            naive = model(input_ids=ids, attention_mask=attn).logits
    finally:
        handle.remove()
    with masked(model, skip), torch.no_grad():
        right = model(input_ids=ids, attention_mask=attn).logits
    assert float((naive - right).abs()[attn.bool()].max()) > 1e-2


# ------------------------------------------------------------------------------------------- export and the optimized graph


@pytest.mark.parametrize("family", NEW)
def test_onnx_and_optimized_graph_match_masked_reference(family, loaded, tmp_path):
    """The exported graph in ONNX Runtime against the masked reference; the optimized graph too, or its refusal
    names the twist it does not rewrite."""
    from exporter.onnx.contract import kept_layers, onnx_signature
    from exporter.onnx.export import export_onnx
    from exporter.onnx.optimize import NotOptimizable, optimize_onnx

    model, tokenizer = loaded(family)
    ids, attn = batch(tokenizer)
    path = export_onnx(apply_skip(model, MASK), tmp_path)
    assert kept_layers(onnx_signature(path)["inputs"]) == [0, 3]  # the contract: caches of kept layers only
    assert_passed(reference_parity(model, MASK, OrtRunner(path), ids, attn))
    reason = NOT_OPTIMIZED.get(family)
    if reason is not None:
        with pytest.raises(NotOptimizable, match=reason):
            optimize_onnx(path, model.config)
        return
    fused = optimize_onnx(path, model.config)
    assert fused["group_query_attention"] == 2
    assert_passed(reference_parity(model, MASK, OrtRunner(tmp_path / fused["path"]), ids, attn))


@pytest.mark.slow
@pytest.mark.parametrize("family", OLD)
def test_onnx_of_older_families_from_folders(family, loaded, tmp_path):
    from exporter.onnx.export import export_onnx

    model, tokenizer = loaded(family)
    path = export_onnx(apply_skip(model, MASK), tmp_path)
    assert_passed(reference_parity(model, MASK, OrtRunner(path), *batch(tokenizer)))


# ------------------------------------------------------------------------------------------- tokenizers


def byte_level_tokenizer(specials: bool = True):
    """A real tokenizer (tokenizers' byte-level BPE, no merges): exactly 256 ids; its pad, bos, eos and unk are ids
    0-3, as in the models' configs (else a family's tokenizer class adds its own past the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not specials:
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=alphabet[0], bos_token=alphabet[1],
                                   eos_token=alphabet[2], unk_token=alphabet[3])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folder_without_tokenizer_files_falls_back_with_a_reason(family, loaded, folders, tmp_path):
    """No tokenizer files: the byte tokenizer with the reason (Qwen2/3 used to give an empty tokenizer and an
    'index 0 is out of bounds' internal error, Gemma one that encodes everything to <unk>); with files: those."""
    import shutil

    _, tokenizer = loaded(family)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.fallback and "\n" not in tokenizer.fallback
    assert batch(tokenizer)[0].shape == (2, 24)
    with_files = tmp_path / "with-tokenizer"
    shutil.copytree(folders(family), with_files)
    byte_level_tokenizer().save_pretrained(with_files)
    _, real = load_model(ModelSource(path=with_files))
    assert not isinstance(real, ByteTokenizer) and len(real) == 256
    assert real.decode(real.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_tokenizer_past_the_vocabulary_is_a_one_line_error(folders, tmp_path):
    """A tokenizer whose ids do not fit the model's embedding (here: Qwen2's class adds <|endoftext|> as id 256,
    the padding id) is refused with one line, not an index error deep in the first forward pass."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders("qwen2"), folder)
    byte_level_tokenizer(specials=False).save_pretrained(folder)
    with pytest.raises(UserError, match="257 tokens but the model's embedding only 256") as err:
        load_model(ModelSource(path=folder))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- serving formats


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_refused_before_any_work_or_written(family, folders, tmp_path, monkeypatch):
    """`export.checkpoint: true` for a family the DeciLM format cannot describe: one line naming the reason,
    before any weights are loaded; for the one it can (this Llama), the folder round-trips."""
    from exporter.pipeline import run as pipeline
    from exporter.recipe import Recipe
    from exporter.pipeline import load
    from exporter.model.source import load_config
    from exporter.pipeline.settings import LoadSettings

    recipe = Recipe.model_validate({"version": 1, "model": {"path": str(folders(family))},
                                    "skip": {"attention": [1, 2], "mlp": [2]},
                                    "export": {"checkpoint": True}, "validate": {"speed": False}})
    reason = CHECKPOINT_REFUSED[family]
    if reason is None:
        load.require_supported(LoadSettings.of(recipe), load_config(recipe.model))
        return
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("weights were loaded before the refusal"))
    out = tmp_path / "art" / family
    with pytest.raises(UserError, match="DeciLM format") as err:
        pipeline.run(recipe, out)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_checkpoint_refusal_exits_2_with_one_line(folders, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {{path: {folders('gemma2')}}}\nexport: {{checkpoint: true}}\n")
    result = cli(recipe, "--out", tmp_path / "a", timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # after the run's header
    assert result.returncode == 2 and len(lines) == 1 and "sandwich norms" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_genai_config_where_onnxruntime_genai_knows_the_family(family, loaded, tmp_path):
    from exporter.backends.genai import CONFIG_FILE, genai_unsupported, write_genai_config

    model, _ = loaded(family)
    if family == "olmo2":  # onnxruntime-genai 0.18 has no olmo2 type
        assert "no model type for olmo2" in genai_unsupported(model.config)
        with pytest.raises(UserError, match="olmo2"):
            write_genai_config(model.config, model.generation_config, tmp_path, "model.onnx", 64)
        return
    write_genai_config(model.config, model.generation_config, tmp_path, "model.onnx", 64)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())["model"]
    assert data["type"] == model.config.model_type and data["decoder"]["head_size"] == model.model.layers[0].self_attn.head_dim


# ------------------------------------------------------------------------------------------- every stage (slow)


def _recipe(tmp_path: Path, folder: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""version: 1
model: {{path: {folder}}}
skip: {{attention: [1, 2], mlp: [2]}}
export: {{precisions: [fp32, fp16], genai: true, max_context: 64}}
tensorrt: {{backends: [tensorrt-rtx], max_batch: 2, max_context: 64, compute_capabilities: [sm89]}}
validate:
  prompts: {json.dumps(PROMPTS)}
  decode_steps: {STEPS}
  atol: {{prefill: {ATOL}, decode: {ATOL}}}
  speed: false
""")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_files", [False, True], ids=["no-tokenizer", "tokenizer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage(family, tokenizer_files, folders, tmp_path):
    """`export-skip RECIPE` on the family's folder: plain and optimized graphs (or the refusal under not_run), fp16,
    tensorrt-rtx engines built on the CPU, genai_config.json run by onnxruntime-genai (or skipped with the reason),
    the tokenizer or the stated fallback."""
    import importlib.util
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders(family), folder)
    if tokenizer_files:
        byte_level_tokenizer().save_pretrained(folder)
    out = tmp_path / "art" / family
    result = cli(_recipe(tmp_path, folder), "--out", out, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"]
    artifacts = {(p["artifact"], p["phase"], p["batch"]) for p in report["parity"]}
    graphs = ["onnx:fp32", "pytorch:skipped", "onnx:fp16"]
    not_run = " ".join(n["reason"] for n in report["not_run"])
    if NOT_OPTIMIZED.get(family):
        assert NOT_OPTIMIZED[family] in not_run and not (out / "model.opt.onnx").exists()
    else:
        graphs.append("onnx:fp32:optimized")
    assert {(g, ph, b) for g in graphs for ph in ("prefill", "decode") for b in (1, 2)} <= artifacts
    for p in report["parity"]:
        if p["artifact"] != "onnx:fp16":
            assert p["atol"] == ATOL and p["max_abs_diff"] <= ATOL
    assert ("tokenizer" in report["model"]) is not tokenizer_files
    if importlib.util.find_spec("tensorrt_rtx"):
        assert {e["precision"] for e in report["engines"]["artifacts"] if e["kind"] == "engine"} == {"fp32", "fp16"}
    if family == "olmo2":
        assert "no model type for olmo2" in not_run and not (out / "genai_config.json").exists()
        return
    if importlib.util.find_spec("onnxruntime_genai"):
        from exporter.backends.genai import genai_greedy
        from exporter.checks.parity import greedy_tokens

        model, tokenizer = load_model(ModelSource(path=folder))
        ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
        with masked(model, MASK):
            ref = greedy_tokens(HFRunner(model), ids, torch.ones_like(ids), STEPS - 1)[0]
        got = genai_greedy(out, ids[0].tolist(), STEPS)
        eos = model.config.eos_token_id
        assert got == (ref[: ref.index(eos) + 1] if eos in ref else ref)
